"""A tiny random Llama with a real tokenizer and chat template, written to a folder.

Byte-level BPE without merges (one token per byte, so any text encodes and decodes back) and
a ChatML template: every server path (text prompts, chat, echo, stop strings) runs, at a
random model's speed. Random weights and `ignore_eos` make token counts exact.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.conftest import save_tiny_model

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_chat_model(folder: Path, max_positions: int = 4096) -> Path:
    """bos 1 and eos 2, as the tokenizer's <s> and </s>."""
    tokenizer = _tokenizer()
    save_tiny_model(folder, vocab_size=len(tokenizer), max_position_embeddings=max_positions)
    tokenizer.save_pretrained(folder)
    return folder

"""`--chat-template`: a Jinja chat template for a model whose tokenizer has none (a base
model's GGUF) or to replace the one it has. The value is the name of one shipped in
`server/chat_templates/` (`gemma3`), a file, or the template text itself, as vLLM takes it."""

from __future__ import annotations

from pathlib import Path

import jinja2

SHIPPED = Path(__file__).parent / "chat_templates"


def shipped_names() -> list[str]:
    return sorted(path.stem for path in SHIPPED.glob("*.jinja"))


def load_chat_template(value: str) -> str:
    """The template text; ValueError naming `chat_template` when it is none of the three or
    does not parse (found at start-up, not at the first chat request)."""
    shipped = SHIPPED / f"{value}.jinja"
    if shipped.is_file():
        text = shipped.read_text(encoding="utf-8")
    elif Path(value).is_file():
        text = Path(value).read_text(encoding="utf-8")
    elif "{{" in value or "{%" in value:
        text = value
    else:
        raise ValueError(
            f"chat_template {value!r} is not a file, a Jinja template, or a shipped template "
            f"({', '.join(shipped_names())})"
        )
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"chat_template does not parse: {error} (line {error.lineno})") from None
    return text

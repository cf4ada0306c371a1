"""`tova-serve`'s flags: defaults from EngineConfig, validation, environment."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys

import pytest

from server import ServerSettings
from server.cli import build_parser, configs, main
from tests.server_utils import REPO
from tova_engine import EngineConfig


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_engine_defaults_come_from_engine_config():
    """Every EngineConfig field has a flag (a new field fails here until it gets one)."""
    args = parse()
    for field in dataclasses.fields(EngineConfig):
        assert getattr(args, field.name) == field.default, field.name
    engine, server = configs(args)
    assert engine == EngineConfig()
    assert args.host == "127.0.0.1" and args.port == 8000
    assert server.max_queue_len is None and server.served_model_names == ()
    assert server == ServerSettings()  # the server's defaults are the settings' own


def test_flags_reach_both_configs():
    engine, server = configs(parse(
        "--model", "m.gguf", "--state-size", "64", "--policy", "h2o", "--max-num-seqs", "3",
        "--prefill-chunk-size", "32", "--dtype", "float32", "--device", "cpu",
        "--load-format", "gguf", "--max-model-len", "1024", "--max-queue-len", "5",
        "--served-model-name", "a", "b", "--api-key", "k", "--kernels", "torch",
        "--enforce-eager", "--cuda-graph-batch-sizes", "1", "2", "--protect-metrics",
        "--max-request-body-bytes", "1000", "--shutdown-timeout", "2.5", "--disable-access-log",
        "--log-requests", "--enable-fault-injection",
    ))
    assert (engine.model, engine.state_size, engine.policy, engine.max_num_seqs) == (
        "m.gguf", 64, "h2o", 3)
    assert (engine.prefill_chunk_size, engine.dtype, engine.load_format) == (32, "float32", "gguf")
    assert engine.max_model_len == 1024
    assert (engine.kernels, engine.enforce_eager, engine.cuda_graph_batch_sizes) == (
        "torch", True, (1, 2))
    assert server.served_model_names == ("a", "b") and server.api_key == "k"
    assert server.max_queue_len == 5 and server.protect_metrics
    assert (server.max_request_body_bytes, server.shutdown_timeout_s) == (1000, 2.5)
    assert not server.access_log and server.log_requests and server.enable_fault_injection


def test_max_num_seqs_auto_and_memory_utilization():
    engine, _ = configs(parse("--max-num-seqs", "auto", "--memory-utilization", "0.5"))
    assert (engine.max_num_seqs, engine.memory_utilization) == ("auto", 0.5)
    assert configs(parse("--max-num-seqs", "7"))[0].max_num_seqs == 7


def _help_entries(text: str) -> dict[str, str]:
    """--help text -> {first option string: its help, on one line}."""
    entries: dict[str, str] = {}
    option = None
    for line in text.splitlines():
        if match := re.match(r"  (-{1,2}[\w-]+)", line):
            option = match.group(1)
            entries[option] = line
        elif option is not None and line.startswith(" " * 10):
            entries[option] += line
        else:
            option = None
    return {name: " ".join(entry.split()) for name, entry in entries.items()}


def test_help_shows_every_default():
    """Each option with a default says it: "(default: X)", or, for a None default, what
    None means in words ("default: the model's name"), never a bare "None"."""
    parser = build_parser()
    entries = _help_entries(parser.format_help())
    checked = 0
    for action in parser._actions:
        if not action.option_strings or action.default is argparse.SUPPRESS:
            continue  # --help, --version
        entry = entries[action.option_strings[0]]
        if action.default is None:
            assert "default: " in entry and "None" not in entry, entry
        else:
            assert f"(default: {action.default})" in entry, entry
        checked += 1
    assert checked > len(dataclasses.fields(EngineConfig))  # every engine flag, server ones too


def test_every_flag_has_a_row_in_the_docs_table():
    table = (REPO / "docs" / "serving.md").read_text()
    for action in build_parser()._actions:
        if action.option_strings and action.default is not argparse.SUPPRESS:
            assert f"| `{action.option_strings[0]}`" in table, action.option_strings[0]


def test_help_never_shows_the_api_key(monkeypatch):
    monkeypatch.setenv("TOVA_API_KEY", "secret-from-env")
    assert "secret-from-env" not in build_parser().format_help()


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("TOVA_API_KEY", "from-env")
    assert configs(parse())[1].api_key == "from-env"
    assert configs(parse("--api-key", "flag"))[1].api_key == "flag"


def test_empty_api_key_in_environment_means_no_key(monkeypatch):
    # compose passes TOVA_API_KEY through even when a .env leaves it empty
    monkeypatch.setenv("TOVA_API_KEY", "")
    assert configs(parse())[1].api_key is None


@pytest.mark.parametrize(("argv", "message"), [
    (["--state-size", "0"], "state_size"),
    (["--max-num-seqs", "many"], "--max-num-seqs"),
    (["--max-num-seqs", "0"], "max_num_seqs"),
    (["--memory-utilization", "1.5"], "memory_utilization"),
    (["--memory-utilization", "0"], "memory_utilization"),
    (["--max-queue-len", "0"], "max_queue_len"),
    (["--api-server-count", "0"], "api_server_count"),
    (["--api-server-count", "some"], "--api-server-count"),
    (["--max-request-body-bytes", "0"], "max_request_body_bytes"),
    (["--shutdown-timeout", "-1"], "shutdown_timeout_s"),
    (["--shutdown-timeout", "nan"], "shutdown_timeout_s"),
    (["--policy", "lru"], "--policy"),
    (["--dtype", "int8"], "--dtype"),
    (["--chat-template", "no-such-template"], "chat_template 'no-such-template' is not a file"),
    (["--chat-template", "{% if %}"], "chat_template does not parse"),
])
def test_invalid_flags_exit_with_the_setting_named(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_unloadable_model_exits_cleanly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "server", "--model", str(tmp_path / "missing.gguf"),
         "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert "tova-serve: error:" in result.stderr and "Traceback" not in result.stderr


def test_chat_template_by_name_file_or_text(tmp_path):
    from server.chat_template import SHIPPED, load_chat_template, shipped_names

    assert "gemma3" in shipped_names()
    gemma = (SHIPPED / "gemma3.jinja").read_text()
    assert configs(parse("--chat-template", "gemma3"))[1].chat_template == gemma
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert load_chat_template(str(path)) == path.read_text()
    assert load_chat_template("{{ messages[0]['content'] }}") == "{{ messages[0]['content'] }}"


def test_api_server_count_auto_follows_the_cores():
    from server.settings import auto_api_server_count
    from tova_engine.execution.threads import usable_cpus

    assert [auto_api_server_count(c) for c in (1, 2, 7, 8, 12, 16, 64)] == [1, 1, 1, 2, 3, 4, 4]
    parser = build_parser()
    _, settings = configs(parser.parse_args([]))
    assert settings.api_server_count == "auto"
    assert settings.front_ends == auto_api_server_count(usable_cpus())
    _, settings = configs(parser.parse_args(["--api-server-count", "3"]))
    assert settings.api_server_count == settings.front_ends == 3

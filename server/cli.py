"""`tova-serve`: load the engine, then serve the OpenAI-compatible API with uvicorn.

Every flag is made from a settings field, `EngineConfig`'s or `ServerSettings`', so a setting,
its default and its help are declared once, on the field (`tova_engine.config.setting`). A
field's metadata holds its help and, where the flag needs them:
    flag      its spelling, when not --field-name
    aliases   more spellings (-tp)
    choices, metavar   as argparse takes them
    env       the environment variable its default comes from
    convert   the flag's text -> the field's value (a ValueError names the setting)
    log_as    what the resolved-config line shows instead of the value (a secret, a template)
The field's type says how the flag reads (`_BY_TYPE`); a bool that is on by default gets a
flag that turns it off (--disable-access-log). A field without help has no flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from server.api_servers import serve_many
from server.serve import log_resolved, serve
from server.settings import ServerSettings
from tova_engine import AsyncEngine, EngineConfig, __version__

logger = logging.getLogger("server")


def _count_or_fraction(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count or a fraction, got {text!r}") from None


def _or_auto(convert: Callable[[str], Any], expected: str) -> Callable[[str], Any]:
    """A flag's reader: a number (`convert`) or the word 'auto'."""
    def read(text: str) -> Any:
        if text == "auto":
            return text
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {expected} or 'auto', got {text!r}") from None

    return read


_int_or_auto = _or_auto(int, "an integer")
_float_or_auto = _or_auto(float, "a number")


# How a field's type reads on the command line, by its annotation as Python keeps it (a string,
# re-spelled: single quotes). A field of a type missing here fails the parser's construction.
_BY_TYPE: dict[str, dict[str, Any]] = {
    "str": {},
    "str | None": {},
    "str | Policy": {},  # a built-in policy's name
    "int": {"type": int},
    "int | None": {"type": int},
    "float": {"type": float},
    "bool": {"action": "store_true"},
    "bool | None": {"action": argparse.BooleanOptionalAction},
    "int | Literal['auto']": {"type": _int_or_auto},
    "float | Literal['auto'] | None": {"type": _float_or_auto},
    "int | float | None": {"type": _count_or_fraction},  # a count or a fraction
    "tuple[int, ...] | None": {"type": int, "nargs": "+"},
    "tuple[str, ...]": {"nargs": "+"},
}


def _flagged(settings: type) -> list[dataclasses.Field]:
    return [field for field in dataclasses.fields(settings) if "help" in field.metadata]


def _turned_off(field: dataclasses.Field) -> bool:
    """A bool that is on by default: its flag turns it off."""
    return field.type == "bool" and field.default is True


def _spellings(field: dataclasses.Field) -> list[str]:
    flag = field.metadata.get("flag", "--" + field.name.replace("_", "-"))
    return [flag, *field.metadata.get("aliases", ())]


def _dest(field: dataclasses.Field) -> str:
    """The attribute argparse stores the flag under (named after its first spelling)."""
    return _spellings(field)[0].removeprefix("--").replace("-", "_")


def _default(field: dataclasses.Field) -> Any:
    if "env" in field.metadata:
        return os.environ.get(field.metadata["env"]) or None  # an empty variable is unset
    if _turned_off(field):
        return False
    # nargs="+" takes no empty list: unset is None, which `configs` reads as the default.
    return None if field.default == () else field.default


def _add_flags(group: argparse._ArgumentGroup, settings: type) -> None:
    for field in _flagged(settings):
        options = {key: field.metadata[key] for key in ("choices", "metavar")
                   if key in field.metadata}
        group.add_argument(*_spellings(field), **_BY_TYPE[field.type], **options,
                           default=_default(field), help=field.metadata["help"])


def _values(settings: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields' values the flags give; a flag left unset (None) leaves the field's default."""
    values = {}
    for field in _flagged(settings):
        value = getattr(args, _dest(field))
        if value is None:
            continue
        if _turned_off(field):
            value = not value
        elif isinstance(value, list):  # nargs="+"
            value = tuple(value)
        convert = field.metadata.get("convert")
        values[field.name] = value if convert is None else convert(value)
    return values


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with "(default: X)"; one whose help already says "default"
    (a None default, in words: what None means) is left as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "default" in action.help:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tova-serve",
        description="OpenAI-compatible server with a fixed-size TOVA key/value state.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_flags(parser.add_argument_group("engine (defaults from tova_engine.EngineConfig)"),
               EngineConfig)
    _add_flags(parser.add_argument_group("server"), ServerSettings)
    return parser


def configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerSettings]:
    """Raises ValueError (naming the setting) for invalid values."""
    engine = EngineConfig(**_values(EngineConfig, args))
    return engine, ServerSettings(**_values(ServerSettings, args))


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config, settings = configs(args)
    except ValueError as exc:
        parser.error(str(exc))
    # "auto" becomes a count here, so the log and every front end see the number.
    settings = dataclasses.replace(settings, api_server_count=settings.front_ends)
    if settings.front_ends > 1:
        serve_many(config, settings)
        return
    try:
        logger.info("starting the engine core process (model %s)", config.model or "embedded")
        engine = AsyncEngine(config)
    except (ValueError, OSError) as exc:  # a model that cannot be found or read
        sys.exit(f"tova-serve: error: {exc}")
    log_resolved(engine, settings)
    try:
        serve(engine, settings)
    except ValueError as exc:  # a setting the app cannot honour for this model
        sys.exit(f"tova-serve: error: {exc}")
    finally:
        engine.shutdown()

"""The command-line interface: one thin layer of argument parsing over the library.

Each subcommand lives in `stepscope.commands.<name>` with `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int`. Heavy imports (torch, transformers) happen inside `run`, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from . import __version__
from .errors import StepscopeError

COMMANDS = ["demo", "trace", "generate", "saliency", "diagnose", "compare", "calibrate", "report", "eval",
            "vllm-stats"]

# the library's errors name its parameters; the CLI says the same with its options (one table, used by `main`)
OPTION_WORDS = [
    (re.compile(r"fmt='(\w+)' or '(\w+)'"), r"--fmt \1 or --fmt \2"),
    (re.compile(r"fmt='(\w+)'"), r"--fmt \1"),
    (re.compile(r"markers=\(start, end\)"), "--markers START END"),
]


def in_option_words(message: str) -> str:
    """A library error message as the CLI says it: parameters (fmt='think') become options (--fmt think)."""
    for pattern, words in OPTION_WORDS:
        message = pattern.sub(words, message)
    return message


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepscope",
        description="Where a reasoning model's step-to-step information flow breaks (Step-Saliency), "
                    "and its test-time repair (StepFlow).")
    parser.add_argument("--version", action="version", version=f"stepscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = importlib.import_module(f"stepscope.commands.{name.replace('-', '_')}")
        p = sub.add_parser(name, help=mod.HELP, description=(mod.__doc__ or mod.HELP).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


def cli_reference_markdown() -> str:
    """The CLI reference (docs/cli.md), generated from the parsers themselves."""
    import os

    old, os.environ["COLUMNS"] = os.environ.get("COLUMNS"), "100"  # argparse wraps to the terminal width
    try:
        parser = build_parser()
        return _reference(parser)
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def _reference(parser: argparse.ArgumentParser) -> str:
    out = ["# CLI reference", "",
           "Generated from the command-line parsers by `python -m stepscope.cli --markdown > docs/cli.md`; "
           "a test checks that it is current.", "", "```text", parser.format_help().rstrip(), "```", ""]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        out += [f"## stepscope {name}", "", "```text", p.format_help().rstrip(), "```", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except StepscopeError as e:
        print(f"stepscope {args.command}: error: {in_option_words(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stepscope {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:
        sys.stdout.write(cli_reference_markdown())
        sys.exit(0)
    sys.exit(main())

"""Every `--option` the README and docs/ give a stepscope command exists in that command's parser (a renamed or
removed option cannot linger in the docs)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from stepscope.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# a command line: `stepscope CMD`, `python -m stepscope.cli CMD` or `-m stepscope.cli CMD` (torchrun)
COMMAND = re.compile(r"(?:\bstepscope|-m stepscope\.cli)\s+(" + "|".join(COMMANDS) + r")\b")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def command_options() -> dict[str, set[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.choices.items()}


def named_options(text: str) -> list[tuple[int, str, str]]:
    """(line number, command, option) for every --option written after `stepscope CMD` on its line (a code line
    continued with a backslash counts as one line; an inline `code span` ends at its closing backtick)."""
    out = []
    lines = text.split("\n")
    joined, starts = [], []
    i = 0
    while i < len(lines):  # join continued code lines
        start, line = i, lines[i]
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i]
        joined.append(line)
        starts.append(start + 1)
        i += 1
    for number, line in zip(starts, joined):
        for m in COMMAND.finditer(line):
            rest = line[m.end():]
            inline = line[:m.start()].count("`") % 2 == 1  # inside an inline code span
            if inline:
                rest = rest.split("`", 1)[0]
            nxt = COMMAND.search(rest)  # the next command on the line gets its own options
            if nxt:
                rest = rest[:nxt.start()]
            rest = rest.split(" # ", 1)[0]  # a shell comment may speak of other things
            for flag in FLAG.findall(rest):
                out.append((number, m.group(1), flag))
    return out


def test_the_parser_finds_command_lines():
    text = ("```bash\nstepscope eval --benchmark aime24 \\\n  --arms baseline --out runs/x   # or --resume\n```\n"
            "Run `stepscope compare --by-meta sal/ --out cmp/` then `--no-such` elsewhere; "
            "torchrun -m stepscope.cli eval --limit 3\n")
    assert named_options(text) == [(2, "eval", "--benchmark"), (2, "eval", "--arms"), (2, "eval", "--out"),
                                   (5, "compare", "--by-meta"), (5, "compare", "--out"), (5, "eval", "--limit")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_option_the_docs_name_exists(page):
    options = command_options()
    text = page.read_text(encoding="utf-8")
    missing = [f"{page.name}:{n}: stepscope {cmd} {flag}" for n, cmd, flag in named_options(text)
               if flag not in options[cmd]]
    assert not missing, "options the docs give that the command does not have:\n" + "\n".join(missing)

"""The README's Python snippets run as written on the bundled model, its links resolve, the docs point nowhere
outside the repository, and the generated CLI/API references are current."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def test_readme_snippets_run(tmp_path, monkeypatch, capsys):
    text = README.read_text(encoding="utf-8")
    quick = text.split("## Quickstart (Python)", 1)[1].split("\n## ", 1)[0]
    blocks = python_blocks(quick)
    assert len(blocks) == 2 and python_blocks(text) == blocks  # every Python snippet of the README runs here
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(blocks[0], "README.md:quickstart", "exec"), ns)  # noqa: S102
    out = capsys.readouterr().out
    assert "thinking" in out and "lock_in_score" in out
    scores = ns["diagnose"](ns["result"]).scores
    assert all(isinstance(scores[k], float) for k in ("lock_in_score", "decay_slope")), scores  # the numbers it shows
    assert ns["result"].maps.shape[0] == 30
    exec(compile(blocks[1], "README.md:stepflow", "exec"), ns)  # noqa: S102  (continues the first snippet)
    out = capsys.readouterr().out
    assert ns["out"].shape[1] > ns["ids"].shape[1]  # it generated
    assert "OEB layer" in out and "SMI layer" in out  # the stats summary, per layer
    assert "no thinking segment" not in out  # the prompt opened the thinking: StepFlow had something to act on


def test_readme_is_a_front_door():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    for cmd in ("bash scripts/demo.sh", "bash scripts/test.sh"):
        assert cmd in text and (ROOT / cmd.split()[1]).is_file()
    for bench in ("aime24", "aime25", "amc23", "math500", "gpqa-diamond", "livecodebench"):
        assert f"| `{bench}` |" in text, bench


def test_readme_and_docs_links_resolve():
    pages = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "RESULTS.md"]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://", target):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to a missing {target}"


def test_docs_point_nowhere_outside_the_repository():
    files = [README, *(ROOT / "docs").rglob("*.md"), *(ROOT / "bench").rglob("*.md"), *(ROOT / "scripts").glob("*")]
    for f in (f for f in files if f.is_file()):
        text = f.read_text(encoding="utf-8")
        for bad in ("METHOD.md", "../shared"):
            assert bad not in text, f"{f.relative_to(ROOT)} mentions {bad}"


def test_generated_docs_are_current():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr

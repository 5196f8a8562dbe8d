"""The HTML report's page, styles and script are package data: they load, a wheel carries them, and the page
built from them keeps model text as data."""

from __future__ import annotations

import base64
import hashlib
import html as html_lib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import require
from test_report import XSS_IMG, XSS_SCRIPT, make_result, parse, payload_of

from stepscope.errors import StepscopeError
from stepscope.report import build_report_html
from stepscope.report import html as rhtml

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ("report.html", "report.css", "report.js")
PLACEHOLDERS = {"csp", "title", "version", "style", "data", "script", "extra", "glossary", "n"}


@pytest.fixture(scope="module")
def result(think_tokenizer):
    return make_result(think_tokenizer)


def test_templates_load_and_name_every_placeholder():
    for name in TEMPLATES:
        assert len(rhtml.template(name)) > 100, name
    page = rhtml.template("report.html")
    assert set(re.findall(r"(?<!\{)\{([a-z]+)\}(?!\})", page)) == PLACEHOLDERS
    with pytest.raises(StepscopeError, match="report.txt"):
        rhtml.template("report.txt")


def test_page_inserts_the_templates_verbatim_and_hashes_the_script(result):
    page = build_report_html([result], title=f"t {XSS_SCRIPT}", labels=[f"l {XSS_IMG}"])
    p = parse(page)
    assert rhtml.template("report.css") in page
    assert p.script_bodies[1] == rhtml.template("report.js")  # the one executable script is the template
    digest = base64.b64encode(hashlib.sha256(rhtml.template("report.js").encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in html_lib.unescape(page)  # the CSP runs exactly that script
    assert [t for t, _ in p.tags].count("script") == 2 and not any(t == "img" for t, _ in p.tags)
    assert f"t {XSS_SCRIPT}" in "".join(p.text)  # the title shows as text, escaped in the markup
    assert f"<title>t {XSS_SCRIPT}</title>" not in page
    data = payload_of(page)
    assert data["results"][0]["label"] == f"l {XSS_IMG}"
    assert "".join(data["results"][0]["texts"]) == result.trace.text


def _declared_patterns() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    line = re.search(r'^"stepscope\.report" = \[(.*)\]$', text, re.M)
    assert line, "pyproject.toml declares no package data for stepscope.report"
    return re.findall(r'"([^"]+)"', line.group(1))


def test_every_template_file_is_declared_package_data():
    patterns = _declared_patterns()
    folder = ROOT / "src" / "stepscope" / "report" / "templates"
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    assert set(TEMPLATES) <= set(files)
    for name in files:
        assert any(Path("templates", name).match(pat) for pat in patterns), f"{name} is not package data"


@pytest.mark.slow
def test_a_built_wheel_carries_the_templates_and_renders(tmp_path, result):
    # build from a copy, so the build leaves nothing in the source tree
    src = tmp_path / "src-copy"
    (src / "src").mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run(["cp", "-r", str(ROOT / "src" / "stepscope"), str(src / "src")], check=True)
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(wheels)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "No module named" in r.stderr and "setuptools" in r.stderr:
        require("SETUPTOOLS", "setuptools is not installed in this environment", "the test extra installs it")
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = wheels.glob("stepscope-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for name in TEMPLATES:
            assert f"stepscope/report/templates/{name}" in names
        z.extractall(site)
    # the installed copy renders the same page as the source tree, from the same (deterministic) result
    out = tmp_path / "page.html"
    code = ("import sys, stepscope; from tiny import make_tokenizer; from test_report import make_result; "
            "from stepscope.report import build_report_html; "
            "assert stepscope.__file__.startswith(sys.argv[1]), stepscope.__file__; "
            "page = build_report_html([make_result(make_tokenizer('think'))], title='t'); "
            "open(sys.argv[2], 'w', encoding='utf-8').write(page)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "tests")])}
    r = subprocess.run([sys.executable, "-c", code, str(site), str(out)], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.read_text(encoding="utf-8") == build_report_html([result], title="t")

"""The HTML report in a real browser: headless Chromium loads it, draws the heatmap and the steps, answers a
hover with both steps' text, follows the layer slider and the result selector, logs nothing to the console,
and shows hostile trace text as text.

Skipped only when /usr/bin/chromium is absent and STEPSCOPE_REQUIRE_BROWSER is unset (CI sets it; there a
missing browser fails the test). `.ci/debian_package.sh chromium /usr/bin/chromium` installs Debian's
chromium.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import require
from test_report import XSS_SCRIPT, make_result

from stepscope.report import render_report

CHROMIUM = os.environ.get("STEPSCOPE_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom"]


def chromium_or_skip() -> str:
    if Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    found = shutil.which("chromium")
    if found:
        return found
    require("BROWSER", f"{CHROMIUM} is absent", "run .ci/debian_package.sh chromium /usr/bin/chromium")


def dump_dom(browser: str, page: Path, profile: Path, fragment: str = "") -> tuple[str, list[str]]:
    """The DOM after the page's scripts ran, and every console message chromium logged."""
    url = page.resolve().as_uri() + fragment
    proc = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", url], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return proc.stdout, console


class DomScan(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.status: dict = {}
        self._in_script = False
        self.texts: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if a.get("id") == "stepscope-status":
            self.status = a
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if not self._in_script:
            self.texts.append(data)


@pytest.fixture(scope="module")
def report_page(tmp_path_factory, think_tokenizer):
    a = make_result(think_tokenizer, L=4, seed=0)
    b = make_result(think_tokenizer, question="What is 1+1?",
                    response="One plus one is two, clearly enough. I will check it once more to be sure.\n"
                             "</think>\n\nTwo.", L=4, seed=1, meta={"id": "second trace"})
    out = tmp_path_factory.mktemp("report") / "report.html"
    render_report([a, b], out)
    return out, a, b


def test_report_renders_in_chromium(report_page, tmp_path):
    browser = chromium_or_skip()
    page, a, b = report_page
    dom, console = dump_dom(browser, page, tmp_path / "profile", "#stepscope-selftest")
    assert console == [], console
    scan = DomScan()
    scan.feed(dom)
    st = scan.status
    assert st, "status element missing"
    assert st["data-ok"] == "1" and st["data-errors"] == "0" and st["data-selftest"] == "1"
    S = a.trace.num_steps
    assert int(st["data-first-steps"]) == S  # every step rendered as a coloured span
    assert int(st["data-first-cells"]) == int((a.maps[0] > 0).sum())  # layer 0 drawn first
    assert int(st["data-results"]) == 2
    # after the slider moves to the end, the last layer is shown
    nonzero_last = int((a.maps[-1] > 0).sum())
    assert st["data-last-layer"] == "3"
    assert int(st["data-norm-cells"]) == nonzero_last  # every non-zero cell of the layer is painted
    # hovering the bottom-left cell names both steps and shows their text
    tip = st["data-tip"]
    assert f"query step {S - 1} (summary)" in tip and "key step 0 (question)" in tip
    assert a.trace.steps[-1].text.strip()[:40] in tip
    assert int(st["data-highlighted"]) == 2
    # step numbers on both axes of the heatmap: the figures' ticks, as text beside the canvas
    from stepscope.report.figures import step_ticks

    assert st["data-axis-ticks"] == ",".join(map(str, step_ticks(S)))
    ticks = [a.get("style", "") for t, a in scan.tags if t == "span" and a.get("class") == "tick"]
    assert len(ticks) == 2 * len(step_ticks(S))
    # the selector switches to the second result
    assert st["data-selected"] == "second trace" and int(st["data-selected-steps"]) == b.trace.num_steps
    # hostile text stayed text: no element but ours, and the strings are visible
    assert [t for t, _ in scan.tags].count("script") == 2
    assert not any(t == "img" for t, _ in scan.tags)
    # back on `a` (the self-test switches back): hostile text is shown as text in the trace view
    assert st["data-steps"] == str(S) and st["data-layer"] == "0"
    visible = "".join(scan.texts)
    assert "The text <script>alert(1)</script> is only text" in visible
    assert "An image tag <img src=x onerror=alert(1)> must stay" in visible
    assert f"xss {XSS_SCRIPT}" in visible  # the label in the selector, as text
    assert re.search(r"No verdict", visible) and "locality" in visible  # verdict line and metrics table


def test_eval_summary_page_renders_in_chromium(tmp_path):
    """summary.html of an evaluation: the tables and the gain-by-length figure render, nothing runs, hostile
    names stay text."""
    browser = chromium_or_skip()
    from test_eval_chain import INFO, build

    from stepscope.evaluate.summary import markdown, summarize
    from stepscope.report.eval_page import write_eval_page

    recs, _ = build((0, 1, 3))
    s = summarize(recs, {**INFO, "model": "<img src=x onerror=alert(1)>"}, n_boot=500, n_perm=500)
    page = write_eval_page(tmp_path / "summary.html", s, markdown(s))
    dom, console = dump_dom(browser, page, tmp_path / "profile")
    assert console == [], console
    scan = DomScan()
    scan.feed(dom)
    tags = [t for t, _ in scan.tags]
    assert tags.count("svg") == 1 and "img" not in tags and "script" not in tags
    assert tags.count("table") == 6  # comparison, arms, length bins, chain and its difference, cost
    visible = "".join(scan.texts)
    assert "<img src=x onerror=alert(1)> on toy" in visible
    assert "gain by chain length (95% CI)" in visible and "bin of baseline's thinking steps" in visible
    assert "70–88" in visible and "20 problems" in visible  # the longest bin's tick label in the figure

"""The report in a real browser: headless Chromium opens the file from disk (file://), with no console errors
and no network requests, and a screenshot is saved in the test's temp dir.

The browser is driven through the DevTools protocol over ``--remote-debugging-pipe`` (JSON messages separated
by NUL bytes on fds 3/4), so no Python package is needed. Every request the page makes is recorded
(``Network.requestWillBeSent``); console errors, uncaught exceptions and log entries (CSP violations land
there) are collected. The page's own layout is checked too: nothing wider than the window.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import test_report as builders

pytest.importorskip("matplotlib")
pytest.importorskip("jinja2")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
WINDOW = (1400, 3000)
TIMEOUT_S = 60.0


class Browser:
    """A minimal DevTools-protocol client over the pipe transport."""

    def __init__(self, profile_dir: Path) -> None:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def setup_fds() -> None:  # runs in the child: fd 3 = commands in, fd 4 = responses out
            # dup2 leaves the copies inheritable; Python's own fds are non-inheritable, so nothing else leaks
            # into the browser (hence close_fds=False: closing would also close 3 and 4).
            # Copies first: either pipe fd may itself be 3 or 4. dup2 onto the same fd keeps close-on-exec,
            # hence the explicit set_inheritable.
            r, w = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(r, 3)
            os.dup2(w, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)

        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--user-data-dir={profile_dir}",
                "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, close_fds=False, preexec_fn=setup_fds)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from chromium")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                    raise RuntimeError(f"chromium closed the pipe: {err[-2000:]}")
                self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\0")
        return json.loads(raw)  # type: ignore[no-any-return]

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = TIMEOUT_S) -> dict[str, Any]:
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        deadline = time.monotonic() + timeout
        while True:
            ev = self._read_message(deadline)
            self.events.append(ev)
            if ev.get("method") == method:
                return ev

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self._read_message(deadline))
        except TimeoutError:
            pass

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.proc.stderr:
            self.proc.stderr.close()


# Layout facts measured by the browser itself: the arm labels' boxes, the heatmap cells' rendered sizes, the
# words of names (a word drawn on two lines was broken inside it: <wbr> splits names into text nodes).
_LAYOUT_JS = """JSON.stringify({
    armLabels: Array.from(document.querySelectorAll('[id*="-gx-arm-label-"]')).map(g => {
        const t = g.querySelector('text') || g; const r = t.getBoundingClientRect();
        return [r.left, r.top, r.right, r.bottom, t.textContent]; }),
    cells: Array.from(document.querySelectorAll('figure.heatmap rect > title')).map(t => {
        const r = t.parentElement.getBoundingClientRect(); return [r.width, r.height]; }),
    brokenNames: Array.from(document.querySelectorAll('td.name, .card .value, table.udr-compact td'))
        .flatMap(el => Array.from(el.childNodes).filter(n => n.nodeType === 3 && n.textContent.trim()))
        .flatMap(n => Array.from(n.textContent.matchAll(/\\S+/g)).map(m => [n, m.index, m[0]]))
        .filter(([n, at, word]) => { const r = document.createRange(); r.setStart(n, at);
                       r.setEnd(n, at + word.length);
                       const tops = new Set(Array.from(r.getClientRects()).map(x => Math.round(x.top)));
                       return tops.size > 1; })
        .map(([n, at, word]) => word),
    clippedColumnLabels: Array.from(document.querySelectorAll('figure.heatmap text.col')).filter(t => {
        const r = t.getBoundingClientRect(), box = t.closest('.heatmap-scroll').getBoundingClientRect();
        return r.top < box.top - 1 || r.right > box.right + 1; }).length
})"""


def open_in_browser(html_path: Path, screenshot: Path, work_dir: Path, width: int = WINDOW[0]) -> dict[str, Any]:
    """Load ``html_path`` from disk; return requests, errors and layout facts; save a PNG screenshot."""
    import base64

    url = html_path.resolve().as_uri()
    browser = Browser(work_dir / "chromium-profile")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})
        session = browser.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})[
            "sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": WINDOW[1],
                                                            "deviceScaleFactor": 1, "mobile": False},
                     session=session)
        browser.events.clear()
        browser.send("Page.navigate", {"url": url}, session=session)
        browser.wait_for("Page.loadEventFired")
        browser.drain(0.5)
        facts = browser.send("Runtime.evaluate", {"returnByValue": True, "expression": """JSON.stringify({
            title: document.title,
            svgs: document.querySelectorAll('svg').length,
            tooltips: document.querySelectorAll('svg rect > title').length,
            scrollWidth: document.documentElement.scrollWidth,
            height: document.documentElement.scrollHeight,
            sections: Array.from(document.querySelectorAll('section.view')).map(s => s.id),
            sidebar: !!document.querySelector('aside.sidebar'),
            emptySvgs: Array.from(document.querySelectorAll('svg')).filter(
                s => s.getBoundingClientRect().width < 20 || s.getBoundingClientRect().height < 20).length
        })"""}, session=session)
        layout = browser.send("Runtime.evaluate", {"returnByValue": True, "expression": _LAYOUT_JS},
                              session=session)
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
    finally:
        browser.close()
    requests = [ev["params"]["request"]["url"] for ev in browser.events
                if ev.get("method") == "Network.requestWillBeSent"]
    errors: list[str] = []
    for ev in browser.events:
        method, params = ev.get("method"), ev.get("params", {})
        if method == "Runtime.exceptionThrown":
            errors.append(json.dumps(params.get("exceptionDetails", {}))[:500])
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
            errors.append(json.dumps(params.get("args", []))[:500])
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") in ("error", "warning"):
            errors.append(params["entry"].get("text", "")[:500])
    return {"url": url, "requests": requests, "errors": errors, **json.loads(facts["result"]["value"]),
            **json.loads(layout["result"]["value"])}


@pytest.fixture(scope="module")
def seven_b_shaped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return builders.make_seven_b_shaped(tmp_path_factory.mktemp("report_7b"))


@pytest.fixture(scope="module")
def nan_spike_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return builders.make_nan_spike_run(tmp_path_factory.mktemp("report_nan_run"))


def _require_chromium() -> None:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs the Debian package)")
        pytest.skip("chromium is not installed")


def check_page(result: dict[str, Any], width: int = WINDOW[0]) -> None:
    assert result["requests"] == [result["url"]], result["requests"]  # the file itself, nothing else
    assert result["errors"] == [], result["errors"]
    assert result["scrollWidth"] <= width, f"page wider than the window: {result['scrollWidth']}px"
    assert result["emptySvgs"] == 0


def _write(tmp_path: Path, path: Path, **kwargs: Any) -> Path:
    from gradience.report import write_report

    return write_report(path, tmp_path / "report.html", **kwargs)


@pytest.mark.slow
def test_adapter_report_with_base_in_chromium(tmp_path: Path, seven_b_shaped: dict[str, Path]) -> None:
    """A 7B-shaped adapter (32 blocks x 7 targets, r=16, small dims) with its base: heatmaps with UDR."""
    _require_chromium()
    out = _write(tmp_path, seven_b_shaped["adapter"], base_model=str(seven_b_shaped["base"]),
                 base_norms_cache=str(tmp_path / "norms.json"))
    result = open_in_browser(out, tmp_path / "adapter_7b_shaped.png", tmp_path)
    check_page(result)
    assert result["sections"] == ["adapter"]
    assert result["sidebar"]
    assert result["tooltips"] >= 3 * 224  # utilization, k@90 and UDR cells, one tooltip each
    print(f"screenshot: {tmp_path / 'adapter_7b_shaped.png'}", file=sys.stderr)


@pytest.mark.slow
def test_run_report_with_nan_and_spikes_in_chromium(tmp_path: Path, nan_spike_run: Path) -> None:
    _require_chromium()
    out = _write(tmp_path, nan_spike_run)
    result = open_in_browser(out, tmp_path / "run_nan_spikes.png", tmp_path)
    check_page(result)
    assert result["sections"] == ["run"]
    assert result["svgs"] >= 3  # loss, lr, grad norm
    print(f"screenshot: {tmp_path / 'run_nan_spikes.png'}", file=sys.stderr)


def _overlaps(boxes: list[list[Any]]) -> list[tuple[str, str]]:
    return [(a[4], b[4]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]]


@pytest.mark.slow
@pytest.mark.parametrize("width", [1400, 800])
def test_bench_and_compare_pages_read_at_a_glance(tmp_path: Path, width: int) -> None:
    """Issue 17 item 2, measured in the browser at both widths: the bench chart's arm labels never overlap,
    heatmap cells are drawn at ≥ 14 px with no column label clipped, names break only between their parts."""
    _require_chromium()
    from gradience.report import write_report

    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "bench.json").write_text(json.dumps(builders.make_bench_doc()))
    bench = open_in_browser(write_report(tmp_path / "bench"), tmp_path / f"bench_{width}.png", tmp_path, width)
    check_page(bench, width)
    assert len(bench["armLabels"]) == 10  # nine arms and the probe
    assert _overlaps(bench["armLabels"]) == []
    assert all(b[3] - b[1] >= 6 for b in bench["armLabels"]), bench["armLabels"]  # drawn, not squashed
    assert bench["brokenNames"] == []

    seven_b = builders.make_seven_b_shaped(tmp_path / "7b")
    other = builders.synthetic.write_synthetic_adapter(tmp_path / "other", layers=32, targets=builders.synthetic
                                                       .llama_targets(builders.HIDDEN, builders.INTER), r=16,
                                                       alpha=32, seed=9)
    from gradience.cli.main import main

    cmp_json = tmp_path / "cmp.json"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["compare", str(seven_b["adapter"]), str(other), "--json", "--base-model",
                     str(seven_b["base"]), "--base-norms-cache", str(tmp_path / "norms.json")]) == 0
    cmp_json.write_text(buf.getvalue())
    cmp = open_in_browser(write_report(cmp_json), tmp_path / f"compare_{width}.png", tmp_path, width)
    check_page(cmp, width)
    assert len(cmp["cells"]) == 5 * 224
    assert min(min(w, h) for w, h in cmp["cells"]) >= 14
    assert cmp["clippedColumnLabels"] == 0
    assert cmp["brokenNames"] == []
    print(f"screenshots: {tmp_path}", file=sys.stderr)

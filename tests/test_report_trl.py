"""The report's TRL section (issue 22): monitor's ``trl`` block as one table per TRL trainer group, naming its
trl/trainer/*_trainer.py file, with small multiples of the group's headline metrics drawn by the run view's chart
code. Inputs are real TRL-named logs (a run.jsonl with TRL fields in train_step events, a trainer_state.json with
GRPO's names in log_history); the numbers on the page are checked against numpy on the raw values. A run without
TRL metrics gets no section. In Chromium at 1400 and 800 px: nothing overlaps, nothing is cut off."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.report.curves import RunCurves
from support.logs_runs import reference_jsonl, scripted_run

pytest.importorskip("matplotlib")
pytest.importorskip("jinja2")

DPO = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
       "logps/rejected", "logits/chosen", "logits/rejected")


def _dpo_value(name: str, step: int) -> float:
    """DPO-like values: margins grow from 0, accuracies rise in [0, 1], log-probs negative; not monotone."""
    wiggle = 0.05 * math.sin(1.7 * step + len(name))
    if name == "rewards/accuracies":
        return min(1.0, 0.5 + step / 80 + wiggle)
    if name.startswith("logps/"):
        return -120.0 + step * (0.3 if "chosen" in name else -0.4) + 3 * wiggle
    return (0.02 if "chosen" in name or "margins" in name else -0.01) * step + wiggle


def _dpo_run(path: Path, nan_step: int | None = 33) -> tuple[Path, dict[int, dict[str, float]]]:
    """A run.jsonl with DPO's metrics in every train_step (as GradienceCallback records them) and eval
    rewards/margins, rewards/accuracies in the run's evals."""
    events: list[tuple[str, int, dict[str, Any]]] = []
    trl: dict[int, dict[str, float]] = {}
    for event, step, data in scripted_run(60):
        if event == "train_step":
            trl[step] = {n: _dpo_value(n, step) for n in DPO}
            if step == nan_step:
                trl[step]["rewards/margins"] = math.nan
            events.append((event, step, {**data, **trl[step]}))
        else:
            events.append((event, step, {"split": data["split"], "metrics": {
                **data["metrics"], "rewards/margins": 0.01 * step, "rewards/accuracies": 0.5 + step / 200}}))
    return reference_jsonl(path, events), trl


def _grpo_state(path: Path, n: int = 40) -> tuple[Path, dict[int, dict[str, float]]]:
    """A trainer_state.json whose log_history holds GRPO's names (trl/trainer/grpo_trainer.py), as the Trainer
    keeps them: bare keys in train entries, ``eval_`` prefixed ones in eval entries."""
    history: list[dict[str, Any]] = []
    values: dict[int, dict[str, float]] = {}
    for step in range(1, n + 1):
        values[step] = {"reward": 0.2 + 0.015 * step + 0.03 * math.sin(step), "reward_std": 0.3 - step / 400,
                        "kl": 0.001 * step + 0.0005 * math.cos(step), "entropy": 1.2 - step / 100,
                        "completions/mean_length": 180.0 + step, "clip_ratio/region_mean": 0.0}
        history.append({"loss": 0.01 * math.sin(step), "learning_rate": 1e-6, "grad_norm": 0.3, "epoch": step / n,
                        "step": step, **values[step]})
        if step % 10 == 0:
            history.append({"eval_loss": 0.02, "eval_reward": 0.25 + step / 100, "step": step, "epoch": step / n})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"log_history": history, "global_step": n}))
    return path, values


def _g(x: float) -> str:
    return format(float(x), ".4g")


def _section(html: str) -> str:
    m = re.search(r'<section class="view" id="trl">(.*?)</section>', html, re.S)
    assert m, "no TRL section"
    return m.group(1).replace("<wbr>", "")


def _rows(section: str) -> dict[str, list[str]]:
    """metric name -> its cells' text (the first table row of that name: the train side's)."""
    rows: dict[str, list[str]] = {}
    for tr in re.findall(r"<tr><td class=\"name\">(.*?)</tr>", section, re.S):
        cells = [re.sub(r"<[^>]+>", "", c).replace("&amp;", "&").strip()
                 for c in re.findall(r"<td[^>]*>(.*?)</td>", "<td>" + tr, re.S)]
        rows.setdefault(cells[0], cells)
    return rows


def test_dpo_section_numbers_match_numpy(tmp_path: Path) -> None:
    from gradience.report import build_report

    path, trl = _dpo_run(tmp_path / "run.jsonl")
    rep = build_report(path)
    assert [v.key for v in rep.views] == ["run", "trl"]
    sec = _section(rep.html)
    assert "DPO/KTO" in sec and "Logged by trl/trainer/dpo_trainer.py" in sec
    assert "<h3>GRPO/RLOO</h3>" not in sec  # only the groups the run logged
    rows = _rows(sec)
    assert set(rows) == set(DPO)
    steps = sorted(trl)
    for name in DPO:
        ys = np.array([trl[s][name] for s in steps])
        ok = np.isfinite(ys)
        fs, fy = [s for s, k in zip(steps, ok, strict=True) if k], ys[ok]
        cells = rows[name]
        assert cells[1] == f"{_g(fy[0])} @ {fs[0]} → {_g(fy[-1])} @ {fs[-1]}"
        assert cells[2] == f"{_g(fy.min())} @ {fs[int(fy.argmin())]}"
        assert cells[3] == f"{_g(fy.max())} @ {fs[int(fy.argmax())]}"
        # trend over the last 20 finite points, in the metric's units (numpy's least squares)
        xs = np.array(fs[-20:], dtype=float)
        change = np.polyfit(xs, fy[-20:], 1)[0] * (xs[-1] - xs[0])
        assert f"({change:+.4g} over steps {int(xs[0])}–{int(xs[-1])})" in cells[4]
        assert cells[5].startswith(str(len(steps)))
        assert ("(1 NaN/Inf)" in cells[5]) == (name == "rewards/margins")
    # the eval side: a sub-table of its own, the eval values as logged (steps 10, 20, ..., 60)
    assert "eval: eval" in sec
    assert sec.count("rewards/margins</td>") == 2  # train and eval
    text = re.sub(r"<[^>]+>", "", sec)
    assert "0.1 @ 10 → 0.6 @ 60" in text and "0.55 @ 10 → 0.8 @ 60" in text
    # small multiples for DPO's headline metrics, drawn by the report's chart code (inline SVG, titled)
    svgs = re.findall(r"<svg[^>]*>.*?</svg>", sec, re.S)
    assert [re.search(r'aria-label="([^"]*)"', s).group(1) for s in svgs] == [  # type: ignore[union-attr]
        "rewards/margins", "rewards/accuracies"]
    assert "NaN/Inf (1 steps)" in svgs[0]  # the NaN margin is a red tick, as on the loss chart


def test_grpo_trainer_state_charts_reward_and_kl(tmp_path: Path) -> None:
    from gradience.report import build_report

    path, values = _grpo_state(tmp_path / "out" / "trainer_state.json")
    sec = _section(build_report(path).html)
    groups = re.findall(r"<h3>(.*?)</h3>", sec)
    assert groups == ["GRPO/RLOO", "SFT and several trainers"]  # kl and entropy are logged by several trainers
    assert "Logged by trl/trainer/grpo_trainer.py" in sec
    rows = _rows(sec)
    r = np.array([values[s]["reward"] for s in sorted(values)])
    assert rows["reward"][3] == f"{_g(r.max())} @ {int(r.argmax()) + 1}"
    assert rows["kl"][1].endswith(f"{_g(values[40]['kl'])} @ 40")
    titles = re.findall(r'<svg class="chart" role="img" aria-label="([^"]*)"', sec)
    assert titles[:2] == ["reward", "kl"]  # GRPO's headline pair
    assert "kl: its row is under SFT and several trainers." in sec
    assert "eval: eval" in sec  # eval_reward in log_history: the eval side


def test_run_without_trl_shows_nothing_new(tmp_path: Path) -> None:
    from gradience.report import build_report

    path = reference_jsonl(tmp_path / "run.jsonl", scripted_run(30))
    rep = build_report(path)
    assert [v.key for v in rep.views] == ["run"]
    assert 'id="trl"' not in rep.html and "TRL metrics" not in rep.html


def test_curves_keep_trl_headline_values_exactly() -> None:
    """The charts' data: TRL headline values of train steps and evals, step for step; a plain train step costs
    no TRL lookup and adds no curve."""
    curves = RunCurves()
    curves.feed("train_step", 1, {"loss": 1.0, "lr": 1e-3})
    ys = [0.1, -0.2, math.inf, 0.4]
    for i, y in enumerate(ys, start=2):
        curves.feed("train_step", i, {"loss": 1.0, "rewards/margins": y, "logps/chosen": -3.0})
    curves.feed("eval", 5, {"split": "test", "metrics": {"loss": 1.0, "rewards/margins": 0.5, "accuracy": 0.9}})
    margins = curves.trl["rewards/margins"]
    assert [(b.x_first, b.lo) for b in margins.buckets if b.n] == [(2.0, 0.1), (3.0, -0.2), (5.0, 0.4)]
    assert margins.nonfinite_steps == [4.0]
    assert set(curves.trl) == {"rewards/margins"}  # only headline names are drawn
    assert set(curves.trl_eval["test"]) == {"rewards/margins"}  # eval accuracy stays the run view's chart


def _trl_layout(html_path: Path, width: int, shot: Path, work: Path) -> dict[str, Any]:
    """Boxes of the TRL section's charts and tables as Chromium lays them out, and whether any table needs
    its horizontal scroll (a column cut off)."""
    import base64

    from test_report_browser import WINDOW, Browser

    browser = Browser(work / "chromium-profile-trl")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})
        session = browser.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})[
            "sessionId"]
        browser.send("Page.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": WINDOW[1],
                                                            "deviceScaleFactor": 1, "mobile": False},
                     session=session)
        browser.send("Page.navigate", {"url": html_path.resolve().as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        facts = browser.send("Runtime.evaluate", {"returnByValue": True, "expression": """JSON.stringify({
            boxes: Array.from(document.querySelectorAll('#trl figure.chart-box, #trl table.trl, #trl h3'))
                .map((e, i) => { const r = e.getBoundingClientRect();
                                 return [r.left, r.top, r.right, r.bottom, e.tagName + i]; }),
            section: (() => { const r = document.getElementById('trl').getBoundingClientRect();
                              return [r.left, r.right]; })(),
            cut: Array.from(document.querySelectorAll('#trl .table-scroll'))
                .filter(d => d.scrollWidth > d.clientWidth + 1).length,
            svgWidths: Array.from(document.querySelectorAll('#trl svg')).map(s => s.getBoundingClientRect().width)
        })"""}, session=session)
        browser.send("Runtime.evaluate", {"expression": "document.getElementById('trl').scrollIntoView()"},
                     session=session)
        png = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        shot.write_bytes(base64.b64decode(png["data"]))
    finally:
        browser.close()
    return json.loads(facts["result"]["value"])  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.parametrize("width", [1400, 800])
def test_trl_section_in_chromium(tmp_path: Path, width: int) -> None:
    """The DPO + GRPO page in a real browser: offline, no console error, nothing wider than the window; in the
    TRL section no chart or table overlaps another, none sticks out of the section, no table column is cut."""
    from test_report_browser import _overlaps, _require_chromium, check_page, open_in_browser

    _require_chromium()
    from gradience.report import write_report

    path, _ = _dpo_run(tmp_path / "run.jsonl")
    # GRPO's names too, so both groups (and their charts) are on one page
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    for rec in lines:
        if rec["event"] == "train_step":
            rec.update({"reward": 0.1 * rec["step"], "kl": 0.002 * rec["step"], "entropy": 1.0})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = write_report(path, tmp_path / "report.html")
    result = open_in_browser(out, tmp_path / f"trl_{width}.png", tmp_path, width)
    check_page(result, width)
    assert result["sections"] == ["run", "trl"]
    assert result["brokenNames"] == []  # metric names break only at "/" and "_"
    lay = _trl_layout(out, width, tmp_path / f"trl_section_{width}.png", tmp_path)
    assert len([b for b in lay["boxes"] if b[4].startswith("FIGURE")]) == 5  # DPO: 2, GRPO: reward, kl; shared: entropy
    assert _overlaps(lay["boxes"]) == []
    left, right = lay["section"]
    assert all(left <= b[0] and b[2] <= right + 0.5 for b in lay["boxes"]), lay
    assert lay["cut"] == 0
    assert min(lay["svgWidths"]) >= 300  # small multiples, still readable
    print(f"screenshots: {tmp_path}", file=sys.stderr)


def test_hostile_names_are_escaped(tmp_path: Path) -> None:
    """TRL-prefixed names and an eval split carrying markup reach the page as text, never as elements."""
    from gradience.report import build_report

    events: list[tuple[str, int, dict[str, Any]]] = []
    for step in range(1, 6):
        events.append(("train_step", step, {"loss": 1.0, "logps/<img src=x onerror=alert(1)>": -float(step),
                                            "rewards/margins": 0.1 * step}))
    events.append(("eval", 5, {"split": "<b>x</b>", "metrics": {"loss": 1.0, "rewards/margins": 0.4}}))
    sec = _section(build_report(reference_jsonl(tmp_path / "run.jsonl", events)).html)
    assert "<img" not in sec and "<b>x" not in sec
    assert "logps/&lt;img" in sec and "eval: &lt;b&gt;x&lt;/b&gt;" in sec


@pytest.mark.slow
def test_tensorboard_run_gets_the_same_section(tmp_path: Path) -> None:
    """A TensorBoard run written by a real SummaryWriter with TRL's tag names (train/rewards/margins, ...) and
    the equivalent run.jsonl give the same TRL section, charts included."""
    pytest.importorskip("tensorboard")
    from gradience.report import build_report
    from test_monitor_trl import _reference, _trl_run, _write_tensorboard

    events, trl = _trl_run(list(DPO))
    eval_trl = {"rewards/margins": 0.25, "rewards/accuracies": 0.75}
    tb = _section(build_report(_write_tensorboard(tmp_path, events, trl, eval_trl)).html)
    ref = _section(build_report(_reference(tmp_path / "run.jsonl", events, trl, eval_trl)).html)
    assert _rows(tb) == _rows(ref) and set(_rows(tb)) == set(DPO)
    labels = re.findall(r'aria-label="([^"]*)"', tb)
    assert labels == re.findall(r'aria-label="([^"]*)"', ref) == ["rewards/margins", "rewards/accuracies"]

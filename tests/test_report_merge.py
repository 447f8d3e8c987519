"""report's merge view (issue 19 item 3): a real ``gradience merge`` of synthetic adapters, then ``report`` on
the output directory and on its merge.json. The heatmap cells are checked against a dense numpy computation
from the input factors (cos of the updates, retained energy of the best rank-k approximation), the colour bars
against the cells, the table order against the interference, and the inputs against their files' sha256."""

from __future__ import annotations

import contextlib
import hashlib
import html
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.cli.main import main
from support import synthetic
from test_report import _luminance, heatmaps

TARGETS = synthetic.llama_targets(32, 64)
LAYERS = 3
N_MODULES = LAYERS * len(TARGETS)


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as exc:
            rc = int(exc.code or 0)
    return rc, out.getvalue(), err.getvalue()


def _factors(adapter: Path) -> dict[str, np.ndarray]:
    """ΔW = (alpha/r)·B·A per module name, from the raw tensors and the config (not gradience's reader)."""
    from safetensors.numpy import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[key.replace("lora_A", "lora_B")].astype(np.float64)
            out[name] = (cfg["lora_alpha"] / a.shape[0]) * b @ a.astype(np.float64)
    return out


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("report_merge")
    a = synthetic.write_synthetic_adapter(tmp / "task-a", layers=LAYERS, targets=TARGETS, r=4, alpha=8, seed=1,
                                          base_model_name_or_path="tiny/base")
    # B lacks v_proj: those modules are merged with zero in B (partial), no pair to measure interference on.
    b_targets = {k: v for k, v in TARGETS.items() if k != "v_proj"}
    b = synthetic.write_synthetic_adapter(tmp / "task-b", layers=LAYERS, targets=b_targets, r=2, alpha=4, seed=2,
                                          base_model_name_or_path="tiny/base")
    out: dict[str, Any] = {"a": a, "b": b, "tmp": tmp}
    for method, extra in (("svd", ["--rank", "2"]), ("ties", ["--rank", "3"])):
        rc, _, err = _cli("merge", str(a), str(b), "--out", str(tmp / method), "--weights", "0.7,0.3",
                          "--method", method, *extra)
        assert rc == 0, err
        out[method] = tmp / method
    return out


def _report(path: Path, out: Path) -> str:
    rc, _, err = _cli("report", str(path), "-o", str(out))
    assert rc == 0, err
    return out.read_text()


def _cells(m: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c[3]: (c[2], c[4]) for c in m["cells"]}


def test_svd_merge_page_matches_dense_numpy(merged: dict[str, Any], tmp_path: Path) -> None:
    page = _report(merged["svd"], tmp_path / "svd.html")
    from_json = heatmaps(_report(merged["svd"] / "merge.json", tmp_path / "svd2.html"))
    assert {t: m["cells"] for t, m in from_json.items()} == {t: m["cells"] for t, m in heatmaps(page).items()}
    assert "<title>Merge of task-a + task-b</title>" in page
    maps = heatmaps(page)
    assert set(maps) == {"interference (conflict)", "cos of the input updates", "retained energy", "rank written"}
    for title, m in maps.items():
        assert len(m["cells"]) == N_MODULES, title   # 3 blocks x 7 module types
        assert all(w >= 14 and h >= 14 for w, h, *_ in m["cells"]), title

    da, db = _factors(merged["a"]), _factors(merged["b"])
    assert len(da) == N_MODULES and len(db) == N_MODULES - LAYERS
    cos_cells = _cells(maps["cos of the input updates"])
    energy_cells = _cells(maps["retained energy"])
    for name, dw_a in da.items():
        dense = 0.7 * dw_a + (0.3 * db[name] if name in db else 0.0)
        s = np.linalg.svd(dense, compute_uv=False)
        assert energy_cells[name][1] == f"{100 * float(np.sum(s[:2] ** 2) / np.sum(s ** 2)):.1f}%", name
        if name in db:
            cos = float(np.sum(dw_a * db[name]) / (np.linalg.norm(dw_a) * np.linalg.norm(db[name])))
            assert float(cos_cells[name][1]) == pytest.approx(cos, abs=6e-4), name
        else:  # partial module: hatched ("not computed"), never a colour of the scale
            assert cos_cells[name][0].startswith("url(#") and cos_cells[name][0].endswith("-na)"), name

    # Colour bars span the data (end labels = the cells' min and max); more = darker on sequential maps.
    for title in ("interference (conflict)", "retained energy"):
        computed = [c for c in maps[title]["cells"] if not c[2].startswith("url(")]
        vals = [float(c[4].rstrip("%")) for c in computed]
        lo, hi = computed[int(np.argmin(vals))], computed[int(np.argmax(vals))]
        assert maps[title]["legend"][:2] == [lo[4], hi[4]], title
        assert _luminance(hi[2]) < _luminance(lo[2]) - 0.2, title
    assert len([c for c in maps["interference (conflict)"]["cells"] if c[2].startswith("url(")]) == LAYERS
    # the cos map is diverging: its zero is labelled and a negative cell is red, a positive one blue
    cos_vals = {n: float(v) for n, (f, v) in cos_cells.items() if not f.startswith("url(")}
    assert "0" in maps["cos of the input updates"]["legend"]
    assert min(cos_vals.values()) < 0 < max(cos_vals.values())


def test_table_leads_with_the_most_interfering_and_inputs_carry_sha256(merged: dict[str, Any],
                                                                       tmp_path: Path) -> None:
    page = _report(merged["svd"], tmp_path / "svd.html")
    doc = json.loads((merged["svd"] / "merge.json").read_text())
    table = page.split("Most interfering modules first")[1].split("</table>")[0]
    rows = re.findall(r'<td class="name">(.*?)</td><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td>'
                      r'<td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td>', table)
    assert len(rows) == min(N_MODULES, 25)
    conflicts = [float(r[6]) if r[6] != "-" else -1.0 for r in rows]
    assert conflicts == sorted(conflicts, reverse=True)
    # the first rows are merge's own "most interfering" list, in its order
    names = [html.unescape(re.sub(r"<wbr>|<span.*", "", r[0])).strip() for r in rows]
    assert names[:len(doc["summary"]["most_interfering"])] == doc["summary"]["most_interfering"]
    partial_row = next(r for r, n in zip(rows, names, strict=True) if n.endswith("v_proj"))
    assert partial_row[1] == "4 + ·" and partial_row[2] == "4" and "(partial)" in partial_row[0]
    full_row = next(r for r, n in zip(rows, names, strict=True) if n.endswith("q_proj"))
    assert full_row[1:4] == ("4 + 2", "6", "2")
    for adapter in (merged["a"], merged["b"]):
        sha = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
        assert f'title="{sha}">{sha[:12]}…</code>' in page
    plain = page.replace("<wbr>", "")
    assert f"{merged['a']}</td><td>0.7</td>" in plain and f"{merged['b']}</td><td>0.3</td>" in plain


def test_ties_page_shows_sign_conflicts(merged: dict[str, Any], tmp_path: Path) -> None:
    page = _report(merged["ties"] / "merge.json", tmp_path / "ties.html")
    doc = json.loads((merged["ties"] / "merge.json").read_text())
    maps = heatmaps(page)
    assert "sign-conflict rate" in maps
    signs = _cells(maps["sign-conflict rate"])
    for row in doc["modules"]:
        rate = row["sign_conflict_rate"]
        if rate is None:  # v_proj: only one input holds it
            assert row["name"].endswith("v_proj") and signs[row["name"]][0].startswith("url("), row["name"]
        else:
            assert signs[row["name"]][1] == f"{100 * rate:.1f}%", row["name"]
    assert {v for _f, v in _cells(maps["rank written"]).values()} == {"3"}
    assert "density=0.2" in page


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda d: d.update(modules="x"), "'modules' is a string, expected a list of objects"),
    (lambda d: d["modules"][0].update(interference=[1]), "modules[0].interference is a list, expected an object"),
    (lambda d: d["modules"][0]["interference"].update(pairs=[3]), "modules[0].interference.pairs[0] is an integer"),
    (lambda d: d.update(inputs={"a": 1}), "'inputs' is an object, expected a list of objects"),
    (lambda d: d.pop("modules"), "has no 'modules'"),
])
def test_malformed_merge_json_is_one_line_exit_2(merged: dict[str, Any], tmp_path: Path, edit: Any,
                                                 needle: str) -> None:
    doc = json.loads((merged["svd"] / "merge.json").read_text())
    edit(doc)
    bad = tmp_path / "merge.json"
    bad.write_text(json.dumps(doc))
    rc, _, err = _cli("report", str(bad), "-o", str(tmp_path / "x.html"))
    assert rc == 2 and err.count("\n") == 1 and err.startswith("gradience report: error:"), err
    assert needle in err and "Traceback" not in err
    # the same in a directory that holds it
    rc, _, err = _cli("report", str(tmp_path), "-o", str(tmp_path / "x.html"))
    assert rc == 2 and needle in err, err


@pytest.mark.parametrize("content", ['{"log_history": []}', '{"schema": "gradience.audit/v1", "layers": []}', "[]"])
def test_a_directory_whose_merge_json_is_something_else(tmp_path: Path, content: str) -> None:
    (tmp_path / "merge.json").write_text(content)
    rc, _, err = _cli("report", str(tmp_path), "-o", str(tmp_path / "x.html"))
    assert rc == 2 and err.count("\n") == 1 and "merge.json" in err and "Traceback" not in err, err


def test_odd_values_print_as_dashes(merged: dict[str, Any], tmp_path: Path) -> None:
    """Numbers that are strings, NaN, null; a policy name with format braces; markup in names: page, no error."""
    doc = json.loads((merged["ties"] / "merge.json").read_text())
    doc["policy"] = {"name": "{0}{x}", "value": "<b>"}
    doc["method"] = 7
    doc["inputs"][0].update(weight="heavy", sha256=None, path="<script>x</script>")
    doc["summary"].update(energy_retained_min=float("nan"), conflict_max="high", ranks_after=None)
    row = doc["modules"][0]
    row.update(energy_retained="1", r_after=None, ranks_before=[None, "x"], name="<img src=x>.layers.0.q_proj")
    row["interference"].update(conflict_max=float("inf"), cos_min=True)
    bad = tmp_path / "merge.json"
    bad.write_text(json.dumps(doc))
    page = _report(bad, tmp_path / "odd.html")
    assert "<script>x" not in page and "<img src=x>" not in page and "&lt;script&gt;" in page
    maps = heatmaps(page)
    assert _cells(maps["interference (conflict)"])["<img src=x>.layers.0.q_proj"][0].startswith("url(")
    assert "{0}{x}" in page and "min -" in page


@pytest.mark.slow
@pytest.mark.parametrize("width", [1400, 800])
def test_merge_page_in_chromium(merged: dict[str, Any], tmp_path: Path, width: int) -> None:
    """The page loads nothing else, has no errors, fits the window, cells >= 14 px, no clipped labels."""
    from test_report_browser import _require_chromium, check_page, open_in_browser

    _require_chromium()
    page = tmp_path / "merge.html"
    _report(merged["ties"], page)
    res = open_in_browser(page, tmp_path / f"merge_{width}.png", tmp_path, width)
    check_page(res, width)
    assert len(res["cells"]) == 5 * N_MODULES
    assert min(min(w, h) for w, h in res["cells"]) >= 14
    assert res["clippedColumnLabels"] == 0
    assert res["brokenNames"] == []
    print(f"screenshots: {tmp_path}", file=sys.stderr)

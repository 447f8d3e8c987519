"""Builders for the generated hostile-input corpus (issue 9 item 4): every file is made in a tmp dir by code,
nothing is checked in. Each builder writes real files in the formats Gradience reads (safetensors with raw
headers, PEFT adapter dirs, telemetry JSONL, HF cache layouts) with one thing wrong.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from support.synthetic import write_safetensors, write_synthetic_adapter

REPO_ROOT = Path(__file__).resolve().parents[2]
Q = "base_model.model.model.layers.0.self_attn.q_proj"
K = "base_model.model.model.layers.0.self_attn.k_proj"


def raw_safetensors(path: Path, header_bytes: bytes, data: bytes = b"") -> Path:
    """A safetensors file whose header is exactly ``header_bytes`` (not necessarily valid JSON)."""
    path.write_bytes(len(header_bytes).to_bytes(8, "little") + header_bytes + data)
    return path


def header_file(path: Path, header: dict[str, Any], data: bytes) -> Path:
    return raw_safetensors(path, json.dumps(header).encode(), data)


def good_adapter(out: Path, **overrides: Any) -> Path:
    """A one-layer synthetic adapter (q_proj and k_proj, r=4, alpha=8) to mutate."""
    return write_synthetic_adapter(out, layers=1, targets={"q_proj": (16, 16), "k_proj": (16, 16)}, r=4, alpha=8,
                                   config_overrides=overrides or None)


def adapter_with_tensors(out: Path, tensors: dict[str, np.ndarray], config: dict[str, Any] | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "adapter_model.safetensors", tensors)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    cfg.update(config or {})
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def pair(prefix: str, r: int, d_in: int, d_out: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"{prefix}.lora_A.weight": rng.standard_normal((r, d_in)).astype(np.float32),
            f"{prefix}.lora_B.weight": rng.standard_normal((d_out, r)).astype(np.float32)}


def deep_json(depth: int = 100_000) -> bytes:
    return b"[" * depth + b"]" * depth


def synthetic_base(out: Path, d: int = 16) -> Path:
    """A base checkpoint dir for the good adapter (q_proj, k_proj weights of layer 0)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    write_safetensors(out / "model.safetensors", {
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((d, d)).astype(np.float32),
        "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((d, d)).astype(np.float32),
    })
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return out


def telemetry(path: Path, records: list[dict[str, Any] | str], run_id: str = "r1") -> Path:
    """A JSONL log: dict records get the v1 envelope; strings are written as raw lines."""
    lines = []
    for i, rec in enumerate(records):
        if isinstance(rec, str):
            lines.append(rec)
            continue
        full = {"schema": "gradience.vnext.telemetry/v1", "ts": 1.0 + i, "run_id": run_id, "step": i}
        full.update(rec)
        lines.append(json.dumps(full))
    path.write_text("\n".join(lines) + "\n")
    return path


def run_subprocess(args: list[str], timeout: float = 60, env: dict[str, str] | None = None,
                   **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``python -m gradience ARGS`` with a real stdout/stderr (encoding failures show) and a hard timeout."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO_ROOT / "src") + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "gradience", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, errors="backslashreplace", **kwargs)


# -- issue 17: compare audit JSON, run.jsonl, config and cache cases -------------------------------------------
def deep_list(depth: int, leaf: Any = "NaN") -> Any:
    """A JSON value nested ``depth`` lists deep (within what Python's decoder accepts, beyond what we allow)."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def audit_json_doc(adapter_dir: Path) -> dict[str, Any]:
    """``gradience audit --json --no-udr`` of ``adapter_dir``, run in-process, as a dict to mutate."""
    import contextlib
    import io

    from gradience.cli.main import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["audit", "--peft-dir", str(adapter_dir), "--json", "--no-udr"]) == 0
    doc: dict[str, Any] = json.loads(buf.getvalue())
    return doc


BIG = 10**400  # fits Python's digit limit, overflows every float conversion


def mutated_audit_json(case: str, good: dict[str, Any]) -> str:
    """The text of one hostile audit JSON (compare's ``cm_json_*`` corpus cases)."""
    doc = json.loads(json.dumps(good))
    if case == "bigint":
        return json.dumps(doc).replace('"n_layers": 2', '"n_layers": 1' + "0" * 5000)
    if case == "alpha_bigint":
        doc["adapter"]["lora_alpha"] = BIG
    elif case == "deep_targets":
        doc["adapter"]["target_modules"] = deep_list(900, "q_proj")
    elif case == "multi_list":
        return json.dumps({"schema": "gradience.audit.multi/v1", "adapters": [1, 2]})
    elif case == "nested":
        return "[" * 100_000 + "]" * 100_000
    elif case == "nested_obj":
        return '{"a":' * 100_000 + "1" + "}" * 100_000
    elif case == "r_bigint":
        doc["layers"][0]["r"] = BIG
    elif case == "summary_bigint":
        doc["utilization_mean"] = BIG
    elif case == "util_bigint":
        doc["layers"][0]["utilization"] = BIG
    else:
        raise ValueError(case)
    return json.dumps(doc)


def reference_audit_json(ours: dict[str, Any], *, bench_layout: bool = False) -> dict[str, Any]:
    """What the reference tool (johntnanney/gradience ``audit --json --layers``) writes for the same adapter:
    no ``schema``, no ``adapter`` block, rows under ``layer_data.layer_rows`` (its bench ``audit.json``: under
    ``layers`` with the summary nested) named by full PEFT key, ``delta_fro_norm``/``base_fro_norm`` spelling.
    Built from our audit of the adapter (the metric definitions are the same), so values are comparable."""
    rows = []
    for row in ours["layers"]:
        ref = {k: row[k] for k in ("r", "alpha", "a_shape", "b_shape", "params", "stable_rank", "effective_rank",
                                   "utilization", "sigma_max", "energy_rank_90", "energy_rank_95",
                                   "energy_rank_99", "delta_sigma_max", "scale", "udr", "udr_f", "sdi")}
        ref["name"] = "base_model.model." + row["name"]
        ref["module_type"] = "attn"
        ref["delta_fro_norm"] = row["delta_frob_norm"]
        ref["base_fro_norm"] = row.get("base_frob_norm")
        rows.append(ref)
    summary = {k: ours[k] for k in ("total_lora_params", "n_layers", "stable_rank_mean", "stable_rank_median",
                                    "effective_rank_mean", "utilization_mean", "energy_rank_90_p50",
                                    "energy_rank_90_p90", "by_type")}
    if bench_layout:
        return {"audit_timestamp": "2026-01-13T17:18:26", "probe_rank": 4, "summary": summary, "layers": rows}
    return {**summary, "layer_data": {"layer_rows_schema": "v1", "layer_rows": rows}}


# -- report (issue 17 rp_* cases) ---------------------------------------------------------------------------
REPORT_CASES = ("rp_audit_bigint", "rp_audit_issues_weird", "rp_audit_layers_ints", "rp_audit_layers_str",
                "rp_audit_nonfinite", "rp_bench_wrong_types", "rp_compare_module_types", "rp_compare_wrong_types",
                "rp_out_long_name", "rp_run_huge_loss", "rp_run_step_bigint", "rp_run_surrogate",
                "rp_title_surrogate")


def _bench_doc() -> dict[str, Any]:
    """The smallest bench.json the runner writes (one arm, one seed) to mutate."""
    return {"schema": "gradience.bench/v1", "seeds": [1], "task": {"metric": "accuracy", "higher_is_better": True},
            "probe": {"r": 8, "params": 100}, "policy": {"tolerance": 0.01}, "verdict": "PASS",
            "arms": [{"name": "truncate_median", "kind": "truncate", "r": 2, "params": 25, "params_ratio": 0.25,
                      "per_seed": [{"seed": 1, "metric": 0.9, "delta": 0.0, "ci95": [-0.01, 0.01],
                                    "verdict": "PASS"}],
                      "aggregate": {"mean_delta": 0.0, "sd_delta": None, "verdict": "PASS"}}]}


def _compare_doc() -> dict[str, Any]:
    return {"schema": "gradience.compare/v1", "a": {"path": "a"}, "b": {"path": "b"},
            "summary": {"n_matched": 1, "cos_mean": 0.5},
            "modules": [{"name": "model.layers.0.self_attn.q_proj", "cos": 0.5, "overlap_left": 0.4,
                         "overlap_right": 0.3, "k": 2, "a": {"utilization": 0.2, "udr": 0.1},
                         "b": {"utilization": 0.3, "udr": 0.2}, "delta": {"utilization": 0.1, "udr": 0.1}}],
            "issues": []}


def report_case(case: str, root: Path, good_audit: dict[str, Any]) -> list[str]:
    """The ``gradience report`` arguments of one hostile case, its input written under ``root``
    (``good_audit``: an audit JSON document of a small adapter, e.g. :func:`audit_json_doc`)."""
    root.mkdir(parents=True, exist_ok=True)
    out = str(root / "out.html")
    audit = json.loads(json.dumps(good_audit))
    if case.startswith("rp_audit_"):
        what = case.removeprefix("rp_audit_")
        if what == "bigint":
            audit["total_lora_params"] = BIG
        elif what == "issues_weird":
            audit["issues"] = [1, "two", None, {"code": 3, "message": ["x"], "modules": 7}]
        elif what == "layers_ints":
            audit["layers"] = [1, 2, 3]
        elif what == "layers_str":
            audit["layers"] = "model.layers.0.self_attn.q_proj"
        elif what == "nonfinite":
            audit["adapter"]["r"] = math.inf
            for row in audit["layers"]:
                row.update(r=math.inf, energy_rank_90=math.nan, utilization=math.inf, singular_values=[math.nan])
        path = root / "audit.json"
        path.write_text(json.dumps(audit))  # NaN / Infinity as Python's json writes them
        return [str(path), "-o", out]
    if case == "rp_bench_wrong_types":
        doc = _bench_doc()
        doc.update(task=["accuracy"], arms=[{"name": "x", "aggregate": [1], "per_seed": {"1": 2}}], policy="strict",
                   udr={"probe": [1], "arms": {"x": "y"}})
        path = root / "bench.json"
        path.write_text(json.dumps(doc))
        return [str(path), "-o", out]
    if case.startswith("rp_compare_"):
        doc = _compare_doc()
        if case == "rp_compare_module_types":
            doc["modules"] = [{"name": "model.layers.0.self_attn.q_proj", "cos": BIG, "overlap_left": "0.4",
                               "k": [2], "a": 5, "b": {"udr": BIG}, "delta": "x"}, 7, {"name": {"x": 1}}]
        else:
            doc.update(a=[1], b="b", summary=[], modules={"x": 1}, issues="none")
        path = root / "compare.json"
        path.write_text(json.dumps(doc))
        return [str(path), "-o", out]
    if case == "rp_out_long_name":
        path = root / "audit.json"
        path.write_text(json.dumps(audit))
        return [str(path), "-o", str(root / ("r" * 300 + ".html"))]
    if case.startswith("rp_run_"):
        path = root / "run.jsonl"
        records: list[dict[str, Any] | str] = [{"event": "run_start", "config": {"model_name": "m"}}]
        for step in range(1, 30):
            loss: Any = 1.0 / step
            if case == "rp_run_huge_loss":
                loss = 1e308 * (1 if step % 2 else -1)
            records.append({"event": "train_step", "step": step, "loss": loss, "lr": 1e-4})
        if case == "rp_run_step_bigint":
            records.append({"event": "train_step", "step": BIG, "loss": 0.5})
            records.append({"event": "train_step", "step": 31, "loss": BIG})
        if case == "rp_run_surrogate":
            records[0] = {"event": "run_start", "config": {"model_name": "m\ud800x", "dataset_name": "\udcff"}}
            records.append({"event": "alert", "step": 3, "severity": "warning", "code": "c\ud800",
                            "message": "lone \udfff surrogate"})
        telemetry(path, records)
        return [str(path), "-o", out]
    if case == "rp_title_surrogate":
        path = root / "audit.json"
        path.write_text(json.dumps(audit))
        return [str(path), "-o", out, "--title", "t\udcff\ud800itle"]
    raise ValueError(case)


# -- bench (issue 17 item 6) -------------------------------------------------------------------------------------
TINY_BENCH_YAML = """train: {max_steps: 4, eval_steps: 4, lr: 0.005, per_device_train_batch_size: 16}
lora: {probe_r: 4, alpha: 8}
task: {max_train_samples: 64, max_eval_samples: 16}
compression: {allowed_ranks: [1, 2, 4], acc_tolerance: 0.05}
arms: [truncate_median]
"""


def yaml_alias_bomb(where: str) -> str:
    """A billion-laughs bench config (9 levels of 9 aliases: 9^9 leaves) with the bomb at ``where``."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    body = {"arms": "arms: [*a8]", "flag": "lora: {use_rslora: *a8}", "seeds": "seeds: [*a8]",
            "version": "bench_version: *a8"}[where]
    return "\n".join([*lines, body]) + "\n"


def bench_state(out: Path, kind: str) -> Path:
    """A bench output dir whose ``bench_config.json`` is hostile: fifo, dir, garbage, latin1, nested, devzero."""
    out.mkdir(parents=True, exist_ok=True)
    state = out / "bench_config.json"
    if kind == "fifo":
        os.mkfifo(state)
    elif kind == "dir":
        state.mkdir()
    elif kind == "garbage":
        state.write_bytes(b"\x00\x01not json at all")
    elif kind == "latin1":
        state.write_bytes(b'{"a": "caf\xe9 \xff"}')
    elif kind == "nested":
        state.write_bytes(deep_json(100_000))
    elif kind == "devzero":
        state.symlink_to("/dev/zero")
    else:
        raise ValueError(kind)
    return state


def csv_dataset(path: Path, labels: list[Any], n: int = 60) -> Path:
    """A text/label CSV (``labels`` cycled): text labels, or ids up to 1e9, for the bench's classification data."""
    rows = ["text,label"] + [f"sample {i} {'good' if i % 2 else 'bad'},{labels[i % len(labels)]}" for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


def tiny_full_disk(path: Path, kib: int = 64) -> bool:
    """Mount a ``kib``-KiB tmpfs at ``path`` (a full disk for ENOSPC cases); False where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)], capture_output=True)
    return proc.returncode == 0


def unmount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


# -- compress / IO builders (issue 17 item 6) -----------------------------------------------------------------
def f64_adapter(out: Path, a_scale: float, b_scale: float | None = None, r: int = 4, d: int = 16,
                seed: int = 0) -> Path:
    """One q_proj pair stored as F64 with finite values of magnitude ~a_scale (A) and ~b_scale (B)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    decay = 0.5 ** np.arange(r)
    tensors = {f"{Q}.lora_A.weight": rng.standard_normal((r, d)) * a_scale,
               f"{Q}.lora_B.weight": rng.standard_normal((d, r)) * decay * (a_scale if b_scale is None else b_scale)}
    write_safetensors(out / "adapter_model.safetensors", tensors, dtype="F64")
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
                                                         "target_modules": ["q_proj"]}))
    return out


def mismatched_pair_adapter(out: Path) -> Path:
    """lora_A (4, 16) with lora_B (16, 8): no PEFT pair, but it "fits" transposed as r=16 on 4x8."""
    rng = np.random.default_rng(1)
    return adapter_with_tensors(out, {f"{Q}.lora_A.weight": rng.standard_normal((4, 16)).astype(np.float32),
                                      f"{Q}.lora_B.weight": rng.standard_normal((16, 8)).astype(np.float32)})


def many_pairs_adapter(out: Path, n_layers: int = 8, d: int = 256, r: int = 8) -> Path:
    """A larger synthetic adapter (q/k/v/o per layer) whose data spans many pages, for truncate-while-read."""
    targets = {m: (d, d) for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    return write_synthetic_adapter(out, layers=n_layers, targets=targets, r=r, alpha=2 * r)


def huge_rank_pattern_config(adapter: Path, n: int = 100_000) -> Path:
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rank_pattern"] = {f"layers.{i}.x_proj": 2 for i in range(n)}
    cfg_path.write_text(json.dumps(cfg))
    return adapter


def bigint_alpha_config(adapter: Path, digits: int = 400) -> Path:
    cfg_path = adapter / "adapter_config.json"
    text = cfg_path.read_text()
    cfg = json.loads(text)
    cfg["lora_alpha"] = 0
    cfg_path.write_text(json.dumps(cfg).replace('"lora_alpha": 0', '"lora_alpha": 1' + "0" * digits))
    return adapter

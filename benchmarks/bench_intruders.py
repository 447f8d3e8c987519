"""Benchmark intruder detection (issue 23): a 7B-shaped base + r16 adapter, cold and with the base spectra cached.

    python benchmarks/bench_intruders.py [--layers 1] [--spectrum outliers] [--device auto|numpy|cpu|cuda]
                                         [--adapter llama7b_r16_trained_f32] [--dense-baseline]
    # item 5: all 224 linear layers (make_base.py --layers 32 --spectrum outliers first, ~13 GB):
    python benchmarks/bench_intruders.py --layers 32 --interleave --partial /tmp/intruders_partial.json

The base is ``make_base.py``'s synthetic Llama-2-7B checkpoint with ``--layers`` decoder blocks (bf16, 7 linear
weights per block: q/k/v/o 4096×4096, gate/up 11008×4096, down 4096×11008); the adapter is ``make_adapters.py``'s
(32 blocks; only the blocks present in the base are measured, the rest are skipped by name). Two runs of
``gradience.intruders.measure_intruders`` on the same fresh cache directory: cold (every base partial spectrum
computed) and cached (read back). Reported: wall time per run and per layer (median), the extrapolation to all
224 linear layers of a 7B model (per-layer mean × 224, stated as such), the fraction of layers decided from the
first partial SVD alone / a longer one / the dense SVD of W, and the intruder counts. ``--dense-baseline`` also
times PEFT's computation (two dense float32 SVDs, W and W + ΔW) on one 4096×4096 layer. Runs on a GPU when
``--device cuda`` and one is visible. Results go to ``benchmarks/results/intruders-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the CLI: one BLAS thread (2 busy cores here)

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))

import numpy as np  # noqa: E402

from make_adapters import TRAINED_ADAPTERS, ensure_adapter, ensure_trained_adapter  # noqa: E402
from make_base import generate  # noqa: E402

LINEAR_LAYERS_7B = 224
# How many of each shape a 7B model has, per measured representative (--one-per-shape): 32 blocks × (q, k, v, o),
# × (gate, up), × down.
SHAPE_WEIGHT = {"q_proj": 128, "gate_proj": 64, "down_proj": 32}


def _run(pairs: list, base: Path, cache: Path, device: str, k: int, eps: float, labels: tuple[str, ...] = ("",),
         partial: Path | None = None) -> dict[str, dict]:
    """A pass over ``pairs`` for each label, or, with several labels, the labels one after the other on each layer
    (cold then cached of the same tensor: both figures exist for every layer done when a long run is stopped). A
    progress line per layer (wall, CPU, 1-min load average); with ``partial``, the figures so far are rewritten
    after every layer."""
    from gradience.intruders import IntruderOptions, measure_intruders

    state = {label: {"per_layer_s": {}, "load_1min": {}, "report": None} for label in labels}
    started = time.perf_counter()
    for i, pair in enumerate(pairs, 1):  # one layer at a time: wall and CPU seconds per layer (the machine is shared)
        for label in labels:
            st = state[label]
            t0, c0 = time.perf_counter(), time.process_time()
            one = measure_intruders([pair], str(base), IntruderOptions(k=k, eps=eps, device=device,
                                                                       cache_dir=str(cache)))
            st["per_layer_s"][pair.name] = (time.perf_counter() - t0, time.process_time() - c0)
            st["load_1min"][pair.name] = os.getloadavg()[0]
            found = one.per_layer.get(pair.name)
            print(f"[{label} {i}/{len(pairs)} {time.strftime('%H:%M:%S')}] {pair.name}: "
                  f"{st['per_layer_s'][pair.name][0]:.1f} s wall, {st['per_layer_s'][pair.name][1]:.1f} s CPU, "
                  f"load {st['load_1min'][pair.name]:.1f}, {None if found is None else found.count} intruders, "
                  f"decided by {None if found is None else found.decided_by}", flush=True)
            report = st["report"]
            if report is None:
                st["report"] = one
            else:
                report.per_layer.update(one.per_layer)
                report.issues += one.issues
                for key, value in one.stats.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        report.stats[key] = report.stats.get(key, 0) + value
        if partial is not None:
            done = {"layers_done": i, "layers_total": len(pairs), "elapsed_wall_s": time.perf_counter() - started}
            for label, st in state.items():
                rows = st["report"].per_layer
                done[label] = {"cpu_s": sum(c for _w, c in st["per_layer_s"].values()),
                               "wall_s": sum(w for w, _c in st["per_layer_s"].values()),
                               "per_layer_s": st["per_layer_s"], "load_1min": st["load_1min"],
                               "decided_by": {n: la.decided_by for n, la in rows.items()},
                               "counts": {n: la.count for n, la in rows.items()}}
            tmp = partial.with_suffix(".tmp")
            tmp.write_text(json.dumps(done, indent=1) + "\n")
            tmp.replace(partial)
    out: dict[str, dict] = {}
    for label, st in state.items():
        report = st["report"]
        assert report is not None
        per_layer_s = st["per_layer_s"]
        out[label] = {
            "wall_s": sum(w for w, _c in per_layer_s.values()), "cpu_s": sum(c for _w, c in per_layer_s.values()),
            "per_layer_s": per_layer_s, "load_1min": st["load_1min"], "stats": report.stats,
            "summary": report.summary,
            "per_layer": {name: {"count": la.count, "decided_by": la.decided_by, "base_vectors": la.base_vectors,
                                 "products": la.products, "converged": la.converged}
                          for name, la in report.per_layer.items()},
            "issues": [i.code for i in report.issues]}
    return out


def _dense_baseline(base: Path, pairs: list) -> float:
    """PEFT's per-layer work: torch.linalg.svd(W) and svd(W + ΔW), dense, here numpy float32 (one 4096² layer)."""
    from gradience.udr.base import BaseWeights
    from gradience.udr.resolve import resolve_base

    weights = BaseWeights(resolve_base(str(base)))
    pair = next(p for p in pairs if p.d_in == p.d_out)
    w = np.array(weights.read_f32(f"{pair.name}.weight"))
    a, b = pair.load_factors()
    t0 = time.perf_counter()
    np.linalg.svd(w, full_matrices=False)
    np.linalg.svd(w + np.float32(pair.scale) * (b @ a).astype(np.float32), full_matrices=False)
    return time.perf_counter() - t0


def _gpu_visible() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1, help="decoder blocks of the base (default 1 = 7 layers)")
    ap.add_argument("--spectrum", choices=["gaussian", "outliers"], default="outliers")
    ap.add_argument("--adapter", default="llama7b_r16_trained_f32")
    ap.add_argument("--device", default="auto", choices=("auto", "numpy", "cpu", "cuda"))
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--eps", type=float, default=0.5)
    ap.add_argument("--dense-baseline", action="store_true")
    ap.add_argument("--runs", default="cold,cached", help="comma list of cold, cached (default both, in order)")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="base spectra cache (default: a fresh temporary one; give one to run cached later)")
    ap.add_argument("--partial", type=Path, default=None, help="rewrite the figures so far here after every layer")
    ap.add_argument("--limit", type=int, default=None, help="measure only the first N layers (a smoke run)")
    ap.add_argument("--skip", type=int, default=0,
                    help="leave out the first N layers (to continue a stopped --partial run in another process)")
    ap.add_argument("--interleave", action="store_true",
                    help="cold then cached on each layer in turn (both figures for every layer done, even if stopped)")
    ap.add_argument("--one-per-shape", action="store_true",
                    help="measure q_proj, gate_proj and down_proj of block 0 only and extrapolate by shape counts")
    args = ap.parse_args(argv)

    from gradience.adapter import load_adapter
    from gradience.modules import layer_index

    base = generate(args.layers, args.spectrum)
    adapter, _ = (ensure_trained_adapter if args.adapter in TRAINED_ADAPTERS else ensure_adapter)(args.adapter)
    loaded = load_adapter(str(adapter))
    pairs = [p for p in loaded.pairs if (layer_index(p.name) or 0) < args.layers]
    if args.one_per_shape:  # q_proj (4096²), gate_proj (11008×4096), down_proj (4096×11008) of block 0
        pairs = [p for p in pairs if layer_index(p.name) == 0 and p.name.rsplit(".", 1)[-1] in SHAPE_WEIGHT]
    if args.limit is not None:
        pairs = pairs[: args.limit]
    pairs = pairs[max(0, args.skip):]
    runs = [r for r in args.runs.split(",") if r]
    if not runs or any(r not in ("cold", "cached") for r in runs):
        ap.error("--runs takes cold and/or cached")
    out: dict = {"base": str(base), "adapter": str(adapter), "layers_measured": len(pairs), "device": args.device,
                 "gpu_visible": _gpu_visible(), "k": args.k, "eps": args.eps, "cpu_count": os.cpu_count(),
                 "load_avg": os.getloadavg(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="intruder_cache_") as tmp:
        cache = args.cache_dir if args.cache_dir is not None else Path(tmp) / "spectra"
        if "cold" in runs and args.cache_dir is not None and cache.exists() and any(cache.iterdir()):
            # a cold run needs an empty cache; files it did not write are not deleted
            ap.error(f"--cache-dir {cache} is not empty: give an empty or new directory for a cold run")
        results = (_run(pairs, base, cache, args.device, args.k, args.eps, tuple(runs), args.partial)
                   if args.interleave else
                   {label: _run(pairs, base, cache, args.device, args.k, args.eps, (label,), args.partial)[label]
                    for label in runs})
        out["interleaved"] = bool(args.interleave)
        for label in runs:
            res = results[label]
            out[label] = res
            n = max(1, len(res["per_layer"]))
            st = res["stats"]
            if args.one_per_shape:
                est = {kind: sum(v[kind] * SHAPE_WEIGHT[name.rsplit(".", 1)[-1]]
                                 for name, v in ((nm, {"wall": w, "cpu": c}) for nm, (w, c) in
                                                 res["per_layer_s"].items())) for kind in ("wall", "cpu")}
                how = "by shape counts (128 × q, 64 × gate, 32 × down)"
            else:
                est = {"wall": res["wall_s"] / n * LINEAR_LAYERS_7B, "cpu": res["cpu_s"] / n * LINEAR_LAYERS_7B}
                how = "per-layer mean × 224"
            res["extrapolated_224_s"] = est
            print(f"{label}: {res['wall_s']:.1f} s wall, {res['cpu_s']:.1f} s CPU for {n} layers (merged top-k "
                  f"{st['time_merged_s']:.1f} s, base side {st['time_base_s']:.1f} s, read+hash "
                  f"{st['time_read_s']:.1f} s) on {st['device']}; extrapolated to {LINEAR_LAYERS_7B} layers {how}: "
                  f"{est['wall'] / 60:.1f} min wall, {est['cpu'] / 60:.1f} min CPU")
            for name, (w_s, c_s) in res["per_layer_s"].items():
                v = res["per_layer"].get(name, {})
                print(f"    {name}: {w_s:.1f} s wall, {c_s:.1f} s CPU, {v.get('count')} intruders, "
                      f"decided by {v.get('decided_by')}")
            decided = [v["decided_by"] for v in res["per_layer"].values()]
            print(f"  decided from the first partial SVD alone: {decided.count('partial')}/{n}, with its Lanczos "
                  f"bound: {decided.count('lanczos')}/{n}, "
                  f"extended partial: {decided.count('extended')}/{n}, dense SVD of W: {decided.count('dense')}/{n}; "
                  f"cache hits {st['cache_hits']}, base spectra computed {st['base_spectra_computed']}")
            print("  intruders per layer: " + ", ".join(
                f"{name.split('.')[-1]}={v['count']}" for name, v in res["per_layer"].items()))
    for label in runs:
        res = out[label]
        out[f"median_cpu_s_per_layer_{label}"] = statistics.median(c for _w, c in res["per_layer_s"].values())
        res["minutes"] = {"wall": res["wall_s"] / 60, "cpu": res["cpu_s"] / 60}
        res["median_cpu_s_by_shape"] = {
            leaf: statistics.median(c for nm, (_w, c) in res["per_layer_s"].items() if nm.endswith(leaf))
            for leaf in sorted({nm.rsplit(".", 1)[-1] for nm in res["per_layer_s"]})}
        decided = [v["decided_by"] for v in res["per_layer"].values()]
        res["decided_without_dense_fraction"] = (len(decided) - decided.count("dense")) / max(1, len(decided))
        res["decided_by_first_partial_fraction"] = (decided.count("partial") + decided.count("lanczos")) / max(
            1, len(decided))
        print(f"{label}: {res['minutes']['wall']:.1f} min wall, {res['minutes']['cpu']:.1f} min CPU; median CPU s "
              f"per layer by shape {res['median_cpu_s_by_shape']}")
    if "cold" in out and "cached" in out:
        cold, cached = out["cold"]["cpu_s"], out["cached"]["cpu_s"]
        out["cached_over_cold_cpu"] = cached / cold if cold else None
        print(f"cached / cold CPU: {out['cached_over_cold_cpu']:.2f}")
    if args.dense_baseline:
        out["dense_baseline_4096_s"] = _dense_baseline(base, pairs)
        print(f"dense baseline (PEFT's two SVDs) on one 4096x4096 layer: {out['dense_baseline_4096_s']:.1f} s")
    results = BENCH_DIR / "results"
    results.mkdir(exist_ok=True)
    path = results / f"intruders-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``compress --format mlx|peft``: write the compressed adapter in PEFT's layout or in mlx-lm's (issue 21 item 3).

The plan and the factors are the same for both formats (:mod:`gradience.compress.plan`, :mod:`.tensors`); this
module only changes what is written around them:

- **mlx** (``adapters.safetensors`` + mlx-lm's ``adapter_config.json``): mlx-lm applies one ``scale`` to every
  module (``LoRALinear``: ``y + scale · (x @ lora_a) @ lora_b``, mlx_lm/tuner/lora.py) and builds every LoRA layer
  with the one ``lora_parameters.rank`` before loading (``load_adapters`` refuses a tensor whose shape differs,
  mlx_lm/tuner/utils.py), so the output has one rank (lower-rank modules zero-padded, ΔW unchanged) and one
  scale S: each module's factors carry ``coef = s / S`` so that ``S · lora_bᵀ lora_aᵀ`` is its truncated update.
  Factors are stored transposed (``lora_a`` (in, k), ``lora_b`` (k, out)).
- **peft**: ``adapter_model.safetensors`` + a PEFT config (``r``, ``lora_alpha``, ``rank_pattern``), keys
  ``base_model.model.<module>.lora_A.weight`` (A (k, in), B (out, k)).

Module names go through the adapter package's one mapper (:func:`gradience.adapter.mlx.mlx_module_for`,
:func:`gradience.adapter.mlx.peft_module_for`). A conversion that cannot be exact (embeddings, DoRA magnitudes,
LoRA biases, modules_to_save copies, names outside ``model.layers.N``) is refused in one line.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from gradience.adapter.mlx import (
    MLX_WEIGHTS,
    MlxLoader,
    mlx_block_key,
    mlx_module_for,
    mlx_parameters,
    peft_module_for,
)
from gradience.adapter.model import LoadedAdapter
from gradience.adapter.pairs import PEFT_ROOT_PREFIX
from gradience.adapter.sources import SafetensorsSource
from gradience.compress.factors import rescaled_factors
from gradience.compress.result import CompressOptions, LayerPlan
from gradience.compress.tensors import _stored_name, _truncate
from gradience.compress.writer import WEIGHTS_NAME
from gradience.errors import InputError
from gradience.io.safetensors_write import TensorSpec
from gradience.issues import Issue

FORMATS = ("peft", "mlx")
# PEFT config keys that only describe the MLX view (gradience.adapter.mlx.mlx_config_view), never written.
_VIEW_ONLY = ("format", "mlx")


def input_format(loaded: LoadedAdapter) -> str:
    """``mlx`` for an mlx-lm adapter (read through its PEFT view), else ``peft``."""
    return "mlx" if loaded.config.get("format") == "mlx" else "peft"


def weights_name(fmt: str) -> str:
    return MLX_WEIGHTS if fmt == "mlx" else WEIGHTS_NAME


def prepare(loaded: LoadedAdapter, options: CompressOptions) -> str:
    """The output format (default: the input's); refuses a conversion that cannot be exact, and makes an MLX
    output uniform (mlx-lm loads one rank)."""
    fmt = options.format or input_format(loaded)
    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    where = loaded.adapter_weights_path
    if input_format(loaded) == "mlx":
        rank, scale = mlx_parameters(loaded.config["mlx"], loaded.adapter_config_path)
        if rank is None:  # mlx-lm builds its LoRA layers from this number: it cannot load such an adapter either
            raise InputError("MLX adapter config lora_parameters.rank is missing or not a positive integer; "
                             "mlx-lm cannot load this adapter either", loaded.adapter_config_path)
        if scale == 0.0:
            raise InputError("MLX adapter config lora_parameters.scale is 0: the adapter changes nothing, there "
                             "is nothing to compress", loaded.adapter_config_path)
    if fmt != input_format(loaded):
        bad = [p.name for p in loaded.pairs if p.kind != "linear"]
        if bad:
            raise InputError(f"--format {fmt}: {bad[0]} is a {next(p.kind for p in loaded.pairs if p.name == bad[0])}"
                             " LoRA; only linear modules convert exactly between PEFT and MLX", where)
        experts = [p.name for p in loaded.pairs if p.expert is not None]
        if experts:
            raise InputError(f"--format {fmt}: MoE expert adapters ({experts[0]} ...) differ in layout between "
                             "PEFT target_parameters and mlx-lm's LoRASwitchLinear; compress them in their own "
                             "format", where)
        dora = [p.name for p in loaded.pairs if p.dora]
        if dora or loaded.config.get("use_dora"):
            raise InputError(f"--format {fmt}: DoRA ({(dora or ['use_dora'])[0]}): the magnitude vectors are not "
                             "converted between PEFT and MLX yet; compress it in its own format", where)
        if loaded.non_lora.count:
            raise InputError(f"--format {fmt}: {loaded.non_lora.count} non-LoRA tensor(s) "
                             f"({loaded.non_lora.names[0]} ...) have no place in the other format", where)
        for pair in loaded.pairs:  # names first: a refusal before any SVD
            if fmt == "mlx":
                mlx_module_for(pair.name, where)
            else:
                peft_module_for(pair.name, where)
    if fmt == "mlx" and not options.policy.uniform:
        options.policy = dataclasses.replace(options.policy, uniform=True)
    return fmt


def _mlx_scale(loaded: LoadedAdapter) -> float:
    """The one scale S of an MLX output: the input's own (MLX input), else the most common module scale."""
    if input_format(loaded) == "mlx":
        return mlx_parameters(loaded.config["mlx"], loaded.adapter_config_path)[1]
    counts = Counter(p.scale for p in loaded.pairs)
    top = max(counts.values())
    return max(s for s, c in counts.items() if c == top)


def output_config(loaded: LoadedAdapter, layers: list[LayerPlan], config: dict[str, Any], fmt: str
                  ) -> tuple[dict[str, Any], list[Issue]]:
    """The ``adapter_config.json`` to write (``config`` is the plan's PEFT config) and the notes on it. For an MLX
    output each layer's ``coef`` is set to ``s / S`` (S the one mlx-lm scale) and ``config`` (what the report and
    the portability verdict describe) is updated in place to its PEFT equivalent (r = R, lora_alpha = S·R)."""
    issues: list[Issue] = []
    src = input_format(loaded)
    if fmt == "peft":
        out = {k: v for k, v in config.items() if k not in _VIEW_ONLY}
        if src == "mlx":
            mlx = loaded.config["mlx"]
            params = mlx.get("lora_parameters") or {}
            dropout = params.get("dropout")
            out.update({"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none", "fan_in_fan_out": False,
                        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
                        "lora_dropout": float(dropout) if isinstance(dropout, (int, float)) else 0.0,
                        "target_modules": sorted(peft_module_for(la.name, None) for la in layers),
                        "use_dora": False, "use_rslora": False})
            config.update({k: out[k] for k in ("target_modules", "modules_to_save", "use_dora")})  # as reported
            issues.append(Issue("format_converted", "MLX-LM adapter written as PEFT: keys base_model.model.<module>, "
                                                    "A = lora_aᵀ, B = lora_bᵀ, lora_alpha/r = the MLX scale; module "
                                                    "names kept (mlx-lm's tree equals Hugging Face's for the "
                                                    "model.layers.N family)", "info"))
        return out, issues
    scale = _mlx_scale(loaded)
    if scale == 0.0:
        raise InputError("--format mlx: the adapter's scale is 0, so no MLX scale reproduces its update",
                         loaded.adapter_config_path)
    for la in layers:
        assert la.pair is not None
        la.coef = la.pair.scale / scale
        if la.action != "truncated":
            la.method = "copy" if la.verbatim else "rescale"
    rank = max(la.r_after for la in layers)
    # the plan's PEFT config (reported, and judged for portability) becomes the PEFT twin of what is written
    alpha = scale * rank
    config.update({"r": rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
                   "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False})
    if src == "mlx":
        out = dict(loaded.config["mlx"])
        params = dict(out.get("lora_parameters") or {})
    else:
        dropout = config.get("lora_dropout")
        params = {"dropout": float(dropout) if isinstance(dropout, (int, float)) else 0.0,
                  "keys": sorted({mlx_block_key(mlx_module_for(la.name, None)) for la in layers})}
        out = {"fine_tune_type": "lora", "num_layers": -1}
        if isinstance(config.get("base_model_name_or_path"), str):
            out["model"] = config["base_model_name_or_path"]
        scales = sorted({la.pair.scale for la in layers if la.pair is not None})
        issues.append(Issue("format_converted", f"PEFT adapter written as MLX-LM: one scale {scale:g} for every "
                                                f"module (input scales {', '.join(f'{s:g}' for s in scales[:4])}"
                                                f"{' ...' if len(scales) > 4 else ''} folded into the factors), "
                                                "lora_a = Aᵀ, lora_b = Bᵀ, num_layers -1 (every block; blocks "
                                                "without weights keep a zero update)", "info"))
    params.update({"rank": rank, "scale": scale})
    out["lora_parameters"] = params
    issues.append(Issue("mlx_output", f"MLX-LM output (adapters.safetensors, lora_parameters rank {rank}, scale "
                                      f"{scale:g}); the Config and Portability lines describe its PEFT equivalent "
                                      "(lora_alpha = scale · rank)", "info"))
    if any(la.r_after != la.r_before for la in layers) or len({la.r_before for la in layers}) > 1:
        issues.append(Issue("mlx_one_rank", f"MLX output: one rank {rank} for every module (mlx-lm builds each "
                                            "LoRA layer with lora_parameters.rank and refuses other shapes); "
                                            "modules of lower rank are zero-padded", "info"))
    return out, issues


def _transposed(spec: TensorSpec, key: str) -> TensorSpec:
    produce = spec.produce

    def make() -> np.ndarray:
        return np.ascontiguousarray(np.asarray(produce()).T)

    return TensorSpec(key, spec.dtype, tuple(reversed(spec.shape)), make)


class _MlxFactors:
    """The recomputed factors of an MLX input, read through mlx-lm's own orientation (:class:`MlxLoader`: a square
    ``lora_a`` (r, r) is not mistaken for PEFT's A, and a ``LoRASwitchLinear`` stack (E, r, in)/(E, out, r) is
    sliced per expert), one module or one stack at a time, laid out in the output format."""

    def __init__(self, loaded: LoadedAdapter, fmt: str) -> None:
        from gradience.adapter.loader import open_weights

        self.where = loaded.adapter_weights_path
        self.source = open_weights(Path(self.where or ""))
        if isinstance(self.source, SafetensorsSource):
            self.source.use_copies()  # as the tensor writer: a file shrinking meanwhile is an error, not SIGBUS
        self.fmt = fmt
        self.pending: dict[str, dict[str, np.ndarray]] = {}

    def stored(self, key: str) -> str:
        """The safetensors dtype name (F32, BF16, ...) of ``key`` as stored in the input."""
        return _stored_name(self.source.metas()[key].dtype, key, self.where)

    def _factors(self, layer: LayerPlan, stored: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(A' (k, in), B' (out, k)) in float64 with coef folded in, as the PEFT writer computes them."""
        pair = layer.pair
        assert pair is not None
        a, b = MlxLoader(self.source, pair.a_key, pair.b_key, pair.kind, pair.expert).orient(*stored)
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if layer.action == "truncated":
            a_new, b_new, layer.method = _truncate(layer, a, b, self.where)
            return a_new, b_new
        return rescaled_factors(a, b, layer.r_after, layer.coef)

    def _layout(self, group: list[LayerPlan], keys: tuple[str, str]) -> dict[str, np.ndarray]:
        pair = group[0].pair
        assert pair is not None
        read = getattr(self.source, "read_float", self.source.read_f32)
        stored = (read(pair.a_key), read(pair.b_key))  # once per module, once per switch stack (not per expert)
        parts = [self._factors(la, stored) for la in group]
        if pair.expert is not None:  # LoRASwitchLinear: lora_a (E, k, in), lora_b (E, out, k)
            return {keys[0]: np.stack([a for a, _ in parts]), keys[1]: np.stack([b for _, b in parts])}
        (a, b), = parts
        if self.fmt == "peft" or pair.kind == "embedding":  # PEFT's A/B; LoRAEmbedding: keys already swapped
            return {keys[0]: a, keys[1]: b}
        return {keys[0]: a.T, keys[1]: b.T}  # LoRALinear: lora_a (in, k), lora_b (k, out)

    def produce(self, group: list[LayerPlan], keys: tuple[str, str], key: str, dtype: str) -> np.ndarray:
        from gradience.io.safetensors_write import encode_float

        slot = self.pending.get(keys[0])
        if slot is None:
            try:
                slot = self.pending[keys[0]] = {k: encode_float(v, dtype) for k, v in self._layout(group, keys).items()}
            except ValueError as exc:
                raise InputError(f"module {group[0].name}: {exc}; choose another --dtype", self.where) from None
        out = slot.pop(key)
        if not slot:
            del self.pending[keys[0]]
        return out


def _out_shapes(layer: LayerPlan, fmt: str, experts: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    k, d_in, d_out = layer.r_after, layer.d_in, layer.d_out
    if experts:
        return (experts, k, d_in), (experts, d_out, k)
    if fmt == "peft" or layer.kind == "embedding":
        return (k, d_in), (d_out, k)
    return (d_in, k), (k, d_out)


def _out_keys(loaded: LoadedAdapter, layer: LayerPlan, fmt: str) -> tuple[str, str]:
    pair = layer.pair
    assert pair is not None
    if fmt == input_format(loaded):
        return pair.a_key, pair.b_key
    if fmt == "mlx":
        module = mlx_module_for(pair.name, loaded.adapter_weights_path)
        return f"{module}.lora_a", f"{module}.lora_b"
    module = PEFT_ROOT_PREFIX + peft_module_for(pair.name, loaded.adapter_weights_path)
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def output_specs(loaded: LoadedAdapter, layers: list[LayerPlan], specs: list[TensorSpec], fmt: str
                 ) -> list[TensorSpec]:
    """``specs`` (the input's key names and layout, from :func:`gradience.compress.tensors.tensor_specs`) in
    ``fmt``'s names and layout. A PEFT input's factors are transposed on the way out; an MLX input's recomputed
    factors are produced by :class:`_MlxFactors` (stored bytes of unchanged modules are still copied)."""
    src = input_format(loaded)
    if fmt == src == "peft":
        return specs
    groups: dict[str, list[LayerPlan]] = {}
    for la in layers:
        assert la.pair is not None
        groups.setdefault(la.pair.a_key, []).append(la)
    by_key: dict[str, tuple[list[LayerPlan], int]] = {}
    for group in groups.values():
        group.sort(key=lambda la: (la.pair.expert or 0) if la.pair is not None else 0)
        pair = group[0].pair
        assert pair is not None
        by_key[pair.a_key], by_key[pair.b_key] = (group, 0), (group, 1)
    mlx_factors = _MlxFactors(loaded, fmt) if src == "mlx" else None
    out = []
    for spec in specs:
        hit = by_key.get(spec.name)
        if hit is None:
            if fmt != src:
                raise InputError(f"--format {fmt}: tensor {spec.name} is not a LoRA factor and has no place in the "
                                 "other format", loaded.adapter_weights_path)
            out.append(spec)  # a DoRA m or another tensor of an MLX adapter written back as MLX: copied
            continue
        group, side = hit
        keys = _out_keys(loaded, group[0], fmt)
        if mlx_factors is None:  # PEFT in, MLX out: PEFT's (k, in)/(out, k) transposed
            out.append(_transposed(spec, keys[side]))
            continue
        if fmt == src and all(la.verbatim for la in group) and spec.dtype == mlx_factors.stored(spec.name):
            out.append(spec)  # unchanged module, same dtype: its stored bytes
            continue
        pair = group[0].pair
        assert pair is not None
        experts = (pair.num_experts or 0) if pair.expert is not None else 0
        shape = _out_shapes(group[0], fmt, experts)[side]
        out.append(TensorSpec(keys[side], spec.dtype, shape,
                              partial(mlx_factors.produce, group, keys, keys[side], spec.dtype)))
    return out


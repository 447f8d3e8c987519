"""MLX-LM adapters (``adapters.safetensors`` + ``adapter_config.json``) read as LoRA pairs.

Facts from mlx-lm 0.32 (``mlx_lm/tuner/lora.py``, ``tuner/dora.py``, ``tuner/utils.py``, ``lora.py``):

- ``LoRALinear``: ``lora_a`` (in, r), ``lora_b`` (r, out); ``fuse`` adds ``(scale · lora_b.T) @ lora_a.T`` to
  the (out, in) weight, so in PEFT's terms A = lora_a.T, B = lora_b.T and the scale is ``scale`` itself (mlx-lm
  has no alpha: ``lora_parameters: {rank, scale, dropout[, keys]}``, default scale 20);
- ``DoRALinear``: the same factors plus ``m`` (out,), the magnitude of each output row (PEFT's DoRA vector);
- ``LoRASwitchLinear`` (MoE experts): ``lora_a`` (E, r, in), ``lora_b`` (E, out, r), ΔW_e = scale · lora_b[e] ·
  lora_a[e];
- ``LoRAEmbedding``: ``lora_a`` (num_embeddings, r), ``lora_b`` (r, dims), ΔW = scale · lora_a · lora_b;
- the weights file holds ``tree_flatten(model.trainable_parameters())``: keys are module paths in mlx-lm's model
  tree (``model.layers.15.self_attn.q_proj.lora_a``), which for the Llama family equal the Hugging Face names;
  ``num_layers`` says LoRA was put on the last ``num_layers`` blocks.

The pairs built here are the ordinary ``LoraPair`` objects (A (r, d_in), B (d_out, r), ΔW = s·B·A), so every
command reads an MLX adapter through the same math; ``mlx_config_view`` gives the PEFT-equivalent config
(``lora_alpha = scale · rank`` so that alpha / r is mlx-lm's scale).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from gradience.adapter.model import LoraPair, NonLoraTensors, PairKind
from gradience.adapter.pairs import _natural_key, module_name, rank_bound_problem
from gradience.adapter.sources import TensorMeta, TensorSource
from gradience.errors import InputError
from gradience.issues import Issue
from gradience.policy.thresholds import MAX_EXPERTS

MLX_WEIGHTS = "adapters.safetensors"
_LEAVES = ("lora_a", "lora_b", "m")


# mlx-lm's module tree names a decoder block ``model.layers.N`` (``Model.layers`` is ``self.model.layers`` in its
# Llama/Mistral/Qwen/Gemma ports, mlx_lm/models/*.py) and the head ``lm_head``: the same paths as Hugging Face's
# checkpoints of those families, so the name maps one to one. Anything else is refused rather than guessed.
_MLX_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MLX_TOP = ("lm_head",)


def mlx_module_for(module: str, where: str | None) -> str:
    """The mlx-lm module path of a PEFT module name (``base_model.model.`` already stripped); InputError when the
    name is not one whose mlx-lm path is known to be the same."""
    name = module_name(module)
    if _MLX_BLOCK.match(name) or name in _MLX_TOP:
        return name
    raise InputError(f"module {name[:200]} is neither under model.layers.N nor lm_head: its mlx-lm name is not "
                     "known, so it cannot be written as an MLX adapter", where)


def peft_module_for(module: str, where: str | None) -> str:
    """The Hugging Face / PEFT module path of an mlx-lm module (PEFT keys add ``base_model.model.``)."""
    if _MLX_BLOCK.match(module) or module in _MLX_TOP:
        return module
    raise InputError(f"MLX module {module[:200]} is neither under model.layers.N nor lm_head: its Hugging Face "
                     "name is not known, so it cannot be written as a PEFT adapter", where)


def mlx_block_key(module: str) -> str:
    """The ``lora_parameters.keys`` entry of an mlx-lm module path: relative to its block (``self_attn.q_proj``),
    or the full path outside the blocks (``lm_head``), as ``linear_to_lora_layers`` matches them."""
    found = _MLX_BLOCK.match(module)
    return found.group(2) if found else module


def is_mlx_config(config: Mapping[str, Any]) -> bool:
    """An mlx-lm adapter config: ``lora_parameters`` / ``fine_tune_type`` and no PEFT ``peft_type``."""
    return "peft_type" not in config and ("lora_parameters" in config or "fine_tune_type" in config)


def mlx_parameters(config: Mapping[str, Any], where: str | None) -> tuple[int | None, float]:
    """(rank, scale) from ``lora_parameters``; a missing or non-numeric scale is an error (mlx-lm refuses it too)."""
    params = config.get("lora_parameters")
    if not isinstance(params, Mapping):
        raise InputError("MLX adapter config has no lora_parameters object ({rank, scale, dropout})", where)
    rank = params.get("rank")
    scale = params.get("scale")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise InputError(f"MLX adapter config lora_parameters.scale is {scale!r}, not a finite number", where)
    ok_rank = isinstance(rank, int) and not isinstance(rank, bool) and rank > 0
    return (rank if ok_rank else None), float(scale)


def mlx_config_view(config: Mapping[str, Any], where: str | None) -> dict[str, Any]:
    """The PEFT-equivalent view of an mlx-lm config (``lora_alpha = scale · rank``), with the original kept under
    ``mlx`` for writing the format back."""
    rank, scale = mlx_parameters(config, where)
    keys = config["lora_parameters"].get("keys")
    view: dict[str, Any] = {
        "peft_type": "LORA", "r": rank, "lora_alpha": None if rank is None else scale * rank,
        "use_rslora": False, "use_dora": config.get("fine_tune_type") == "dora",
        "target_modules": sorted({k.rpartition(".")[2] for k in keys}) if isinstance(keys, list) else None,
        "base_model_name_or_path": config.get("model"), "format": "mlx", "mlx": dict(config),
    }
    return view


class MlxLoader:
    """Reads one MLX pair and orients it as A (r, d_in), B (d_out, r) (transposes are views)."""

    def __init__(self, source: TensorSource, a_key: str, b_key: str, kind: str, expert: int | None) -> None:
        self.source, self.a_key, self.b_key, self.kind, self.expert = source, a_key, b_key, kind, expert

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        read = getattr(self.source, "read_float", self.source.read_f32)
        return self.orient(read(self.a_key), read(self.b_key))

    def orient(self, lora_a: np.ndarray, lora_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) from the stored tensors (a whole switch stack read once serves every expert's loader)."""
        if self.expert is not None:  # LoRASwitchLinear: (E, r, in) and (E, out, r)
            return lora_a[self.expert], lora_b[self.expert]
        if self.kind == "embedding":  # keys already swapped: A is lora_b (r, dims), B is lora_a (n, r)
            return lora_a, lora_b
        return lora_a.T, lora_b.T


class _MagnitudeLoader:
    def __init__(self, source: TensorSource, key: str) -> None:
        self.source, self.key = source, key

    def __call__(self) -> np.ndarray:
        return self.source.read_f32(self.key).reshape(-1)


def _orient(a: TensorMeta, b: TensorMeta, embedding: bool) -> tuple[int, int, int, int] | None:
    """(experts, r, d_in, d_out) from the stored MLX shapes (experts 0 for a 2-D pair), None when they do not fit."""
    if len(a.shape) == 3 and len(b.shape) == 3:
        experts, r, d_in = a.shape
        if b.shape[0] != experts or b.shape[2] != r:
            return None
        return experts, r, d_in, b.shape[1]
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != b.shape[0]:
        return None
    if embedding:
        return 0, a.shape[1], b.shape[1], a.shape[0]
    return 0, a.shape[1], a.shape[0], b.shape[1]


def build_mlx_pairs(source: TensorSource, config: Mapping[str, Any], where: str | None
                    ) -> tuple[list[LoraPair], NonLoraTensors, list[Issue]]:
    """Pairs of an mlx-lm adapter (``config`` is the original mlx-lm config). Shapes are checked from the headers
    before anything is read; an expert stack above ``MAX_EXPERTS`` or an impossible rank is an error."""
    rank, scale = mlx_parameters(config, where)
    embedding_names = set()
    slots: dict[str, dict[str, TensorMeta]] = {}
    non_lora = NonLoraTensors()
    for key, meta in source.metas().items():
        module, _, leaf = key.rpartition(".")
        if leaf in _LEAVES and module:
            slots.setdefault(module, {})[leaf] = meta
        else:
            non_lora.count += 1
            non_lora.params += meta.numel
            non_lora.names.append(key)
    for module in slots:
        if module.rpartition(".")[2] in ("embed_tokens", "wte", "tok_embeddings", "embeddings"):
            embedding_names.add(module)
    pairs: list[LoraPair] = []
    issues: list[Issue] = []
    unpaired: list[str] = []
    off_rank: list[tuple[str, int]] = []   # (module, factor rank) where lora_parameters.rank says otherwise
    for module, leaves in slots.items():
        a, b = leaves.get("lora_a"), leaves.get("lora_b")
        if a is None or b is None:
            unpaired.extend(m.key for m in leaves.values())
            continue
        if not (a.is_float and b.is_float):
            raise InputError(f"MLX factors of {module} are {a.dtype}/{b.dtype}, not floating point", where)
        kind: PairKind = "embedding" if module in embedding_names else "linear"
        orient = _orient(a, b, kind == "embedding")
        if orient is None:
            raise InputError(f"MLX factors of {module} (lora_a {list(a.shape)}, lora_b {list(b.shape)}) fit "
                             "neither LoRALinear (in, r)/(r, out) nor LoRASwitchLinear (E, r, in)/(E, out, r)", where)
        experts, r, d_in, d_out = orient
        problem = rank_bound_problem(r, d_in, d_out) if r > 0 and d_in > 0 and d_out > 0 else "an empty dimension"
        if problem is None and experts > MAX_EXPERTS:
            problem = f"{experts} experts exceed the limit of {MAX_EXPERTS}"
        if problem is not None:
            raise InputError(f"MLX factors of {module}: {problem}", where)
        if rank is not None and r != rank:
            off_rank.append((module, r))
        m = leaves.get("m")
        mag_ok = m is not None and m.is_float and m.numel == d_out and experts == 0
        # an embedding's ΔW is lora_a·lora_b: lora_b plays A (r, dims) and lora_a plays B (n, r), stored unturned
        a_meta, b_meta = (b, a) if kind == "embedding" else (a, b)
        common: dict[str, Any] = dict(peft_prefix=module, kind=kind, r=r, alpha=scale * r, scale=scale,
                                      a_key=a_meta.key, b_key=b_meta.key, a_shape=a_meta.shape,
                                      b_shape=b_meta.shape, d_in=d_in, d_out=d_out)
        if experts == 0:
            pairs.append(LoraPair(name=module, dora=m is not None,
                                  loader=MlxLoader(source, a_meta.key, b_meta.key, kind, None),
                                  magnitude_key=m.key if mag_ok and m is not None else None,
                                  magnitude_loader=_MagnitudeLoader(source, m.key) if mag_ok and m is not None
                                  else None, **common))
            continue
        for e in range(experts):
            pairs.append(LoraPair(name=f"{module}[{e}]", dora=False, expert=e, num_experts=experts,
                                  parameter=module.rpartition(".")[2],
                                  loader=MlxLoader(source, a.key, b.key, kind, e), **common))
    if unpaired:
        issues.append(Issue("unpaired_factor", f"{len(unpaired)} MLX factor(s) without their twin, not audited: "
                                               f"{', '.join(unpaired[:5])}", modules=unpaired))
    if off_rank:  # one grouped warning: a config written for another rank shows on every module alike
        off_rank.sort(key=lambda mr: _natural_key(mr[0]))
        module, r = off_rank[0]
        ranks = sorted({fr for _, fr in off_rank})
        issues.append(Issue("rank_mismatch", f"{len(off_rank)} of {len(slots)} module(s) have factors of rank "
                                             f"{', '.join(map(str, ranks))}, not lora_parameters.rank={rank} (e.g. "
                                             f"{module}: r={r}); the factor shapes are used",
                            modules=[m for m, _ in off_rank]))
    num_layers = config.get("num_layers")
    if isinstance(num_layers, int) and not isinstance(num_layers, bool):
        blocks = "every block" if num_layers < 0 else f"the last {num_layers} blocks"  # mlx-lm: -1 = all
        issues.append(Issue("mlx_adapter", f"MLX-LM adapter: scale {scale:g} (lora_parameters.scale, applied as is), "
                                           f"LoRA on {blocks} (num_layers)", severity="info"))
    pairs.sort(key=lambda p: _natural_key(p.name))
    return pairs, non_lora, issues

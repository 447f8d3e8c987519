"""MoE expert LoRA: PEFT ``target_parameters`` (``lora.ParamWrapper``) factors split into one pair per expert.

Facts from PEFT 0.21 ``tuners/lora/layer.py`` (``ParamWrapper``):

- a 3-D expert parameter of shape (E, d1, d2) gets ``lora_A`` (r·E, in) and ``lora_B`` (out, r·E); with the
  model's ``is_transposed`` (GPT-OSS: (E, in, out)) in = d1, out = d2, otherwise (Qwen3-MoE, Mixtral, OLMoE:
  (E, out, in)) in = d2, out = d1;
- ``get_delta_weight``: A reshaped (E, r, in) -- expert e's A is rows e·r .. e·r+r-1 --, B reshaped (out, r, E)
  -- expert e's B is every E-th column starting at e --, and ΔW_e = scaling · B_e · A_e (stored as (in, out) for
  a transposed parameter, (out, in) otherwise); scaling is alpha/r (alpha/√r with rsLoRA);
- two targets on one module nest two wrappers, so the saved keys name the *module*, once per nesting level:
  ``experts.lora_A.weight`` (outermost wrapper) and ``experts.base_layer.lora_A.weight`` (the one inside it).
  ``BaseTuner._inject_parameters`` wraps the parameters in the module's registration order, so the innermost
  wrapper (most ``base_layer``s) holds the first registered parameter; transformers' MoE experts register
  ``gate_up_proj`` before ``down_proj``.

The audit math then sees ordinary (r, d_in) / (d_out, r) pairs; each carries ``expert`` and ``parameter``.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Mapping, MutableMapping
from typing import Any

import numpy as np

from gradience.adapter.config import module_rank, module_scale
from gradience.adapter.model import LoraPair
from gradience.adapter.sources import TensorMeta, TensorSource
from gradience.errors import InputError
from gradience.issues import Issue
from gradience.policy.thresholds import MAX_EXPERTS

_BASE_LAYER = ".base_layer"
# Registration order of expert parameters in transformers' MoE blocks (gate/up before down); a parameter not in
# this list keeps the config's order and an info issue says the assignment is assumed.
_REGISTRATION_ORDER = ("gate_up_proj", "gate_proj", "w1", "up_proj", "w3", "down_proj", "w2")
MAX_TARGET_PARAMETERS = 1024


def target_parameters(config: Mapping[str, Any]) -> list[str]:
    """The config's ``target_parameters`` (PEFT ≥ 0.17), as a list of strings; [] when absent."""
    value = config.get("target_parameters")
    if not isinstance(value, (list, tuple)):
        return []
    names = [v for v in value if isinstance(v, str) and v]
    if len(names) > MAX_TARGET_PARAMETERS:
        raise InputError(f"target_parameters lists {len(names)} names; at most {MAX_TARGET_PARAMETERS} are "
                         "supported")
    return names


def strip_wrappers(module: str) -> tuple[str, int]:
    """(module path without PEFT's trailing ``.base_layer`` infixes, how many there were)."""
    depth = 0
    while module.endswith(_BASE_LAYER):
        module, depth = module[: -len(_BASE_LAYER)], depth + 1
    return module, depth


def targeted_leaves(module: str, targets: list[str]) -> list[str]:
    """Parameter names of ``module`` that ``targets`` select (PEFT: ``key == t`` or ``key.endswith("." + t)``)."""
    leaves: list[str] = []
    for target in targets:
        leaf = target.rpartition(".")[2]
        key = f"{module}.{leaf}"
        if (key == target or key.endswith("." + target)) and leaf not in leaves:
            leaves.append(leaf)
    known = [leaf for leaf in _REGISTRATION_ORDER if leaf in leaves]
    return known + [leaf for leaf in leaves if leaf not in known]


class _ExpertGroup:
    """Reads one wrapper's (r·E, in) / (out, r·E) factors once and serves every expert's slices from them."""

    def __init__(self, source: TensorSource, a_key: str, b_key: str, experts: int, r: int, d_in: int,
                 d_out: int) -> None:
        self.source, self.a_key, self.b_key = source, a_key, b_key
        self.experts, self.r, self.d_in, self.d_out = experts, r, d_in, d_out
        self._lock = threading.Lock()
        self._factors: tuple[np.ndarray, np.ndarray] | None = None
        self._served = 0

    def factors(self, expert: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            if self._factors is None:
                self._factors = self.float_stacks()
            a, b = self._factors
            self._served += 1
            if self._served >= self.experts:  # every expert had its slice: drop the whole stack
                self._factors, self._served = None, 0
        lo = expert * self.r
        return a[lo:lo + self.r], b[expert]

    def float_stacks(self) -> tuple[np.ndarray, np.ndarray]:
        """(A (r·E, in), B (E, out, r)) as float arrays, read now and kept by nobody here: expert e's factors are
        ``A[e·r:(e+1)·r]`` and ``B[e]``."""
        read = getattr(self.source, "read_float", self.source.read_f32)
        a = read(self.a_key).reshape(self.experts * self.r, self.d_in)
        # (out, r, E) -> (E, out, r) once: every expert's B is then one contiguous block
        b = read(self.b_key).reshape(self.d_out, self.r, self.experts).transpose(2, 0, 1).copy()
        return a, b

    def _read(self, key: str) -> tuple[np.ndarray, bool]:
        """(stored tensor, bf16 bits?): zero-copy bf16 bits where the source offers them, floats otherwise."""
        for_gram = getattr(self.source, "read_for_gram", None)
        if for_gram is not None:
            out: tuple[np.ndarray, bool] = for_gram(key)
            return out
        return getattr(self.source, "read_float", self.source.read_f32)(key), False

    def stacks_for_gram(self) -> tuple[tuple[np.ndarray, bool], tuple[np.ndarray, bool]]:
        """((A as (E, r, in), bf16?), (B as (out, r, E), bf16?)): the whole stack as stored, reshaped without a
        copy (expert e's A is ``[e]``, its B ``[:, :, e]``), for the audit's batched Gram pass; no cache kept."""
        a, a_bf16 = self._read(self.a_key)
        b, b_bf16 = self._read(self.b_key)
        return ((a.reshape(self.experts, self.r, self.d_in), a_bf16),
                (b.reshape(self.d_out, self.r, self.experts), b_bf16))

    def release(self) -> None:
        """Drop the stack's mapped pages from the process (the source keeps no copy)."""
        release = getattr(self.source, "release", None)
        if release is not None:
            release(self.a_key)
            release(self.b_key)


class _ExpertLoader:
    def __init__(self, group: _ExpertGroup, expert: int) -> None:
        self.group, self.expert = group, expert

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        return self.group.factors(self.expert)


def expert_stack(pair: LoraPair) -> tuple[_ExpertGroup, int] | None:
    """(the stacked parameter's reader, the pair's expert index) for an expert pair read from a
    ``target_parameters`` stack; None for any other pair."""
    loader = pair.loader
    if isinstance(loader, _ExpertLoader):
        return loader.group, loader.expert
    return None


def split_expert_slots(slots: MutableMapping[tuple[str, str | None], Any], source: TensorSource,
                       config: Mapping[str, Any], module_name: Any) -> tuple[list[LoraPair], list[Issue]]:
    """Take the ``target_parameters`` wrappers out of ``slots`` (prefix -> slot with ``a``/``b`` TensorMeta) and
    return their per-expert pairs. Slots of ordinary modules are left in place.

    Raises ``InputError`` (one line, before reading any data) for factors that cannot be a PEFT expert adapter:
    r·E rows that r does not divide, more than ``MAX_EXPERTS`` experts, A's rows differing from B's columns.
    """
    targets = target_parameters(config)
    if not targets:
        return [], []
    groups: dict[tuple[str, str | None], dict[int, tuple[str, Any]]] = defaultdict(dict)
    for slot_key in list(slots):
        prefix, adapter = slot_key
        module, depth = strip_wrappers(module_name(prefix))
        if targeted_leaves(module, targets):
            groups[(module, adapter)][depth] = (prefix, slots.pop(slot_key))
    pairs: list[LoraPair] = []
    assumed: list[str] = []
    for (module, _adapter), wrappers in groups.items():
        leaves = targeted_leaves(module, targets)
        depths = sorted(wrappers)
        if len(leaves) == len(depths) and depths == list(range(len(depths))):
            # depth 0 is the outermost wrapper: the last parameter wrapped
            names = {d: leaves[len(leaves) - 1 - d] for d in depths}
            if any(leaf not in _REGISTRATION_ORDER for leaf in leaves) and len(leaves) > 1:
                assumed.append(module)
        else:
            names = {d: f"wrapper{d}" for d in depths}
            assumed.append(module)
        for depth in depths:
            prefix, slot = wrappers[depth]
            pairs.extend(_expert_pairs(source, config, module, names[depth], prefix, slot.a, slot.b))
    issues = []
    if assumed:
        issues.append(Issue("expert_parameter_assumed",
                            "which target_parameters entry each nested ParamWrapper holds was assumed from "
                            f"transformers' registration order (gate/up before down): {', '.join(assumed[:5])}",
                            severity="info", modules=assumed))
    return pairs, issues


def _expert_pairs(source: TensorSource, config: Mapping[str, Any], module: str, leaf: str, prefix: str,
                  a: TensorMeta | None, b: TensorMeta | None) -> list[LoraPair]:
    param = f"{module}.{leaf}"
    if a is None or b is None:
        present = a if a is not None else b
        raise InputError(f"{param}: expert LoRA factor without its twin ({present.key if present else prefix})")
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1] or 0 in a.shape or 0 in b.shape:
        raise InputError(f"{param}: expert factors A {list(a.shape)} and B {list(b.shape)} do not fit "
                         "A (r·E, in) / B (out, r·E)")
    if not (a.is_float and b.is_float):
        raise InputError(f"{param}: expert factors are {a.dtype}/{b.dtype}, not floating point")
    stacked, d_in, d_out = a.shape[0], a.shape[1], b.shape[0]
    r = module_rank(config, param)
    if r is None:
        r = config.get("r") if isinstance(config.get("r"), int) else None
    if r is None or r <= 0:
        raise InputError(f"{param}: the adapter config gives no rank r, needed to split {stacked} stacked rows "
                         "into experts")
    if stacked % r:
        raise InputError(f"{param}: {stacked} stacked rank rows are not a multiple of r={r} (r·E for E experts)")
    experts = stacked // r
    if experts > MAX_EXPERTS:
        raise InputError(f"{param}: {experts} experts (r={r}, {stacked} rows) exceed the limit of {MAX_EXPERTS}")
    alpha, scale, _ = module_scale(config, param, r)
    if experts == 1:  # a 2-D parameter: one ordinary pair named after the parameter
        group = _ExpertGroup(source, a.key, b.key, 1, r, d_in, d_out)
        return [LoraPair(name=param, peft_prefix=prefix, kind="linear", dora=False, r=r, alpha=alpha, scale=scale,
                         a_key=a.key, b_key=b.key, a_shape=a.shape, b_shape=b.shape, d_in=d_in, d_out=d_out,
                         loader=_ExpertLoader(group, 0), parameter=leaf)]
    group = _ExpertGroup(source, a.key, b.key, experts, r, d_in, d_out)
    return [LoraPair(name=f"{param}[{e}]", peft_prefix=prefix, kind="linear", dora=False, r=r, alpha=alpha,
                     scale=scale, a_key=a.key, b_key=b.key, a_shape=a.shape, b_shape=b.shape, d_in=d_in,
                     d_out=d_out, loader=_ExpertLoader(group, e), expert=e, num_experts=experts, parameter=leaf)
            for e in range(experts)]


def split_expert_name(name: str) -> tuple[str, int | None]:
    """``model.layers.0.mlp.experts.gate_up_proj[3]`` -> (``...gate_up_proj``, 3); other names -> (name, None)."""
    if name.endswith("]"):
        head, sep, index = name[:-1].rpartition("[")
        if sep and index.isdigit():
            return head, int(index)
    return name, None

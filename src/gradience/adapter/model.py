"""Data model of a loaded adapter: the contract between the adapter readers and the audit math.

Readers only look at headers and shapes when they build these objects; tensor data is read when the math
calls ``LoraPair.load_factors()``, one pair at a time, so a 70B adapter never sits in memory at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from gradience.issues import Issue

PairKind = Literal["linear", "embedding", "conv"]


@dataclass
class LoraPair:
    """One LoRA pair. After ``load_factors`` A is (r, d_in) and B is (d_out, r), so ΔW = scale·B·A.

    ``name`` is the module path as the base model names it (``model.layers.5.self_attn.q_proj``);
    ``peft_prefix`` is the raw key prefix (``base_model.model.model.layers.5.self_attn.q_proj``).
    ``a_shape``/``b_shape`` are the shapes as stored in the file.
    """

    name: str
    peft_prefix: str
    kind: PairKind
    dora: bool
    r: int
    alpha: float | None
    scale: float
    a_key: str
    b_key: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    d_in: int
    d_out: int
    # Returns (A, B) oriented as documented above, as float32 or float64 arrays (zero-copy when possible).
    loader: Callable[[], tuple[np.ndarray, np.ndarray]] = field(repr=False, compare=False)
    # DoRA: the key of the magnitude vector m (d_out values) and a reader returning it as a 1-D float array; None
    # for plain LoRA, and for a DoRA pair whose magnitude is missing or misshapen (an issue says which).
    magnitude_key: str | None = None
    magnitude_loader: Callable[[], np.ndarray] | None = field(default=None, repr=False, compare=False)
    # MoE expert LoRA (PEFT target_parameters, adapter/experts.py): the expert index within the stacked parameter,
    # the number of experts, and the parameter's name (``gate_up_proj``); None for an ordinary module.
    expert: int | None = None
    num_experts: int | None = None
    parameter: str | None = None

    @property
    def params(self) -> int:
        return self.r * (self.d_in + self.d_out)

    def load_factors(self) -> tuple[np.ndarray, np.ndarray]:
        return self.loader()

    def load_factors_for_gram(self) -> tuple[tuple[np.ndarray, bool], tuple[np.ndarray, bool]]:
        """((A, bf16?), (B, bf16?)): like :meth:`load_factors`, but a BF16 factor comes as its raw uint16 bits
        (zero-copy) for the chunked Gram pass of the audit; plain float arrays otherwise."""
        for_gram = getattr(self.loader, "for_gram", None)
        if for_gram is None:
            a, b = self.loader()
            return (a, False), (b, False)
        out: tuple[tuple[np.ndarray, bool], tuple[np.ndarray, bool]] = for_gram()
        return out

    def release(self) -> None:
        """Tell the reader the math is done with this pair's data for now (memory-mapped pages are dropped from
        the process; a later ``load_factors`` reads them again)."""
        release = getattr(self.loader, "release", None)
        if release is not None:
            release()

    def load_magnitude(self) -> np.ndarray | None:
        """DoRA magnitude m as a (d_out,) array (PEFT stores (d_out,) or (1, d_out, 1, ...) for conv), or None."""
        return None if self.magnitude_loader is None else self.magnitude_loader().reshape(self.d_out)


@dataclass
class NonLoraTensors:
    """Tensors in the adapter file that are not LoRA factors (``modules_to_save``, heads, lora_B biases); DoRA
    magnitudes belong to their pair (``LoraPair.magnitude_key``), not here."""

    count: int = 0
    params: int = 0
    names: list[str] = field(default_factory=list)


@dataclass
class LoadedAdapter:
    peft_dir: str | None
    adapter_config_path: str | None
    adapter_weights_path: str | None          # the file, or the index file for sharded weights
    config: dict[str, Any]                    # adapter_config.json as read ({} when absent)
    pairs: list[LoraPair]
    non_lora: NonLoraTensors
    issues: list[Issue]
    adapter_name: str | None = None           # subfolder name in a multi-adapter directory

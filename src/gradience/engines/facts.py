"""What an engine looks at in a written adapter: the facts every verdict of :mod:`gradience.engines` reads.

``compress`` builds them from its plan; ``merge``/``verify``/``export`` build them from the adapter they write
or read (:func:`facts_from_config` for an adapter on disk). Kept free of numpy and of any engine import.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Tensors the llama.cpp converter keeps although they are not LoRA factors (convert_lora_to_gguf.py,
# LoraModel.get_tensors: ``"_layernorm" in name or ".norm" in name``).
_NORM_MARKERS = ("_layernorm", ".norm")


@dataclass(frozen=True)
class OutputFacts:
    """The adapter as an engine sees it (sizes, config switches, which non-LoRA tensors it carries).

    The first seven fields are what ``compress`` has always passed; the others default to "absent" so that a
    caller that does not know them gets the conservative verdict of the rows that need them.
    """

    ranks: Sequence[int]          # per module, as written
    config_r: int
    rank_pattern: Mapping[str, int]
    has_modules_to_save: bool     # non-LoRA tensors (modules_to_save copies, heads) in the file
    has_lora_bias: bool           # lora_B biases (PEFT lora_bias=True)
    dora: bool
    kinds: frozenset[str]         # linear / embedding / conv
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    modules_to_save: tuple[str, ...] = ()    # adapter_config.json modules_to_save (names as configured)
    non_lora_names: tuple[str, ...] = ()     # keys of the non-LoRA tensors in the weights file
    bias: str = "none"                       # adapter_config.json "bias" (none / all / lora_only)
    # MoE expert LoRA (issue 21): the config's target_parameters entries, and the PEFT keys of the stacked
    # expert parameters written (``model.layers.0.mlp.experts.gate_up_proj``) when the caller knows them.
    target_parameters: tuple[str, ...] = ()
    expert_parameters: tuple[str, ...] = ()
    expert_shapes: tuple[tuple[str, int, int], ...] = ()  # (parameter, lora_A width d_in, lora_B height d_out)
    adapter_format: str = "peft"             # the layout on disk: "peft", or "mlx" (mlx-lm's adapters.safetensors)

    @property
    def max_rank(self) -> int:
        # vLLM's validate_legal checks max(r, *rank_pattern.values()): the config's r counts too
        return max([*self.ranks, *self.rank_pattern.values(), self.config_r])

    @property
    def uniform(self) -> bool:
        """One rank everywhere and no per-module overrides (what engines with one α/r need)."""
        return len(set(self.ranks)) <= 1 and not self.rank_pattern and not self.alpha_pattern

    @property
    def norm_tensors(self) -> tuple[str, ...]:
        return tuple(n for n in self.non_lora_names if is_norm_tensor(n))

    @property
    def other_non_lora(self) -> tuple[str, ...]:
        """Non-LoRA tensors that are not norms; when only ``has_modules_to_save`` is known, one placeholder."""
        names = tuple(n for n in self.non_lora_names if not is_norm_tensor(n))
        if not names and not self.non_lora_names and self.has_modules_to_save:
            return ("<modules_to_save>",)
        return names


def is_norm_tensor(key: str) -> bool:
    """The llama.cpp converter's test for a layer-norm tensor it keeps (convert_lora_to_gguf.py)."""
    return any(marker in key for marker in _NORM_MARKERS)


def facts_from_config(config: Mapping[str, Any], ranks: Iterable[int], *, kinds: Iterable[str] = ("linear",),
                      non_lora_names: Iterable[str] = (), has_lora_bias: bool = False,
                      dora: bool | None = None, expert_parameters: Iterable[str] = (),
                      expert_shapes: Iterable[tuple[str, int, int]] = (),
                      adapter_format: str | None = None) -> OutputFacts:
    """Facts for an adapter described by its ``adapter_config.json`` and its per-module ranks.
    ``adapter_format``: the layout judged (default: the config's, ``mlx`` for an MLX-LM view)."""
    mts = config.get("modules_to_save")
    mts_names = tuple(str(m) for m in mts) if isinstance(mts, (list, tuple)) else ()
    names = tuple(non_lora_names)
    rank_pattern = config.get("rank_pattern") if isinstance(config.get("rank_pattern"), dict) else {}
    alpha_pattern = config.get("alpha_pattern") if isinstance(config.get("alpha_pattern"), dict) else {}
    # a config is input: a pattern value that is not a number (the loader reports it) is no engine fact
    rank_pattern = {k: v for k, v in (rank_pattern or {}).items() if type(v) is int}
    alpha_pattern = {k: v for k, v in (alpha_pattern or {}).items() if type(v) in (int, float)}
    r = config.get("r")
    tps = config.get("target_parameters")
    targets = tuple(t for t in tps if isinstance(t, str)) if isinstance(tps, (list, tuple)) else ()
    return OutputFacts(
        ranks=list(ranks), config_r=r if isinstance(r, int) and not isinstance(r, bool) else 0,
        rank_pattern=rank_pattern or {}, has_modules_to_save=bool(names) or bool(mts_names),
        has_lora_bias=has_lora_bias or bool(config.get("lora_bias")),
        dora=bool(config.get("use_dora")) if dora is None else dora, kinds=frozenset(kinds),
        alpha_pattern=alpha_pattern or {}, use_rslora=bool(config.get("use_rslora")),
        modules_to_save=mts_names, non_lora_names=names, bias=str(config.get("bias") or "none"),
        target_parameters=targets, expert_parameters=tuple(dict.fromkeys(expert_parameters)),
        expert_shapes=tuple(dict.fromkeys(expert_shapes)),
        adapter_format=adapter_format or ("mlx" if config.get("format") == "mlx" else "peft"))

"""THE table of engine claims: will an adapter load *correctly* (ΔW equal to PEFT's) in PEFT, vLLM, llama.cpp?

Every row names the engine source it encodes (file + function) and the engine versions it holds for. The
verdict is ``{engine: {ok, reason, rules, version}}``; ``rules`` lists the ids of the rows that fired (the
failing ones when not ok, the passing claim when ok) so tests and reports can point at the row.

How each row is tested: PEFT rows with real PEFT in CI (tests/test_compress_peft.py, tests/test_engines.py);
vLLM rows against the documented behaviour of PEFTHelper (vLLM is not installed here: re-read
``vllm/lora/peft_helper.py`` at every release and update :mod:`gradience.engines.vllm`); llama.cpp rows through
the ``gguf`` reader by ``verify``/``export`` (:data:`gradience.engines.llama_cpp.CHECK_HOOK`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gradience.engines import experts as _experts
from gradience.engines import vllm as _vllm
from gradience.engines.facts import OutputFacts

ENGINES = ("peft", "vllm", "llama_cpp")


@dataclass(frozen=True)
class Rule:
    """One engine behaviour: ``fails(facts, version)`` returns the reason the adapter is not served right, or None."""

    id: str
    engine: str
    source: str        # engine file + function the row encodes
    versions: str      # the engine releases it holds for
    fails: Callable[[OutputFacts, Any], str | None]


def _sample(names: tuple[str, ...]) -> str:
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def _top_module(name: str) -> str:
    """The last path component a modules_to_save entry or a saved head tensor names (``score`` of ``score.weight``)."""
    parts = [p for p in name.split(".") if p not in ("weight", "bias", "modules_to_save", "default",
                                                     "original_module")]
    return parts[-1] if parts else name


# -- the layout on disk (every engine) ---------------------------------------------------------------------
def _format_mlx(f: OutputFacts, v: Any) -> str | None:
    if f.adapter_format != "mlx":
        return None
    return ("format: mlx-lm adapter (adapters.safetensors, lora_a (in, r) / lora_b (r, out), "
            "lora_parameters.scale): this engine loads only PEFT's adapter_model.safetensors + adapter_config.json; "
            "convert it first with `gradience compress MLX_DIR --out OUT --format peft` (ΔW unchanged)")


# -- vLLM --------------------------------------------------------------------------------------------------
def _vllm_uniform_legacy(f: OutputFacts, v: Any) -> str | None:
    if _vllm.reads_patterns(v) or f.uniform:
        return None
    return (f"ranks differ per module ({min(f.ranks, default=f.config_r)}..{f.max_rank}) and vLLM releases before "
            f"{'.'.join(map(str, _vllm.PATTERN_RELEASE))} ignore rank_pattern/alpha_pattern (one lora_alpha/r for "
            "every module); rerun with --uniform, or serve with a current vLLM")


def _vllm_modules_to_save(f: OutputFacts, v: Any) -> str | None:
    if not f.has_modules_to_save:
        return None
    if not _vllm.reads_patterns(v):
        return "the adapter has modules_to_save / non-LoRA tensors, which this vLLM release rejects"
    names = set(f.modules_to_save) | {_top_module(n) for n in f.non_lora_names}
    bad = tuple(sorted(n for n in names if n not in _vllm.MODULES_TO_SAVE_ALLOWED))
    if not bad and (f.modules_to_save or f.non_lora_names):
        return None
    return ("vLLM accepts modules_to_save only as classification heads (classifier, score); this adapter also "
            f"saves {_sample(bad) if bad else 'other non-LoRA tensors'}")


def _vllm_dora(f: OutputFacts, v: Any) -> str | None:
    return "DoRA adapters are rejected by vLLM" if f.dora else None


def _vllm_bias(f: OutputFacts, v: Any) -> str | None:
    if f.has_lora_bias:
        if _vllm.reads_patterns(v):
            return "LoRA bias (lora_B biases, lora_bias=True) is rejected outright by vLLM (no switch enables it)"
        return "lora_B biases need this vLLM release's LoRA bias support enabled"
    if f.bias != "none":
        return f"bias={f.bias!r} (trained base biases) is rejected by vLLM (\"Adapter bias is not supported\")"
    return None


def _vllm_conv(f: OutputFacts, v: Any) -> str | None:
    return "conv LoRA layers are not supported by vLLM" if "conv" in f.kinds else None


def _vllm_max_rank(f: OutputFacts, v: Any) -> str | None:
    if _vllm.next_allowed_max_lora_rank(f.max_rank) is None:
        return f"rank {f.max_rank} is above vLLM's largest --max-lora-rank ({_vllm.MAX_LORA_RANKS[-1]})"
    return None


# -- llama.cpp ---------------------------------------------------------------------------------------------
def _cpp_other_tensors(f: OutputFacts, v: Any) -> str | None:
    other = f.other_non_lora
    if not other:
        return None
    return (f"non-LoRA tensors ({_sample(other)}: modules_to_save copies, heads) stop convert_lora_to_gguf.py "
            "(\"Not a lora_A or lora_B tensor\")")


def _cpp_norms(f: OutputFacts, v: Any) -> str | None:
    norms = f.norm_tensors
    if not norms:
        return None
    return (f"modules_to_save norm tensors ({_sample(norms)}) pass convert_lora_to_gguf.py but are silently dropped "
            "at run time by llama.cpp (llama-adapter.cpp skips *_norm.weight), so the served model differs")


def _cpp_dora(f: OutputFacts, v: Any) -> str | None:
    if not f.dora:
        return None
    return "DoRA magnitude vectors are not lora_A/lora_B tensors; convert_lora_to_gguf.py rejects them"


def _cpp_bias(f: OutputFacts, v: Any) -> str | None:
    if not f.has_lora_bias:
        return None
    return "lora_B biases are not lora_A/lora_B tensors; convert_lora_to_gguf.py rejects them"


def _cpp_conv(f: OutputFacts, v: Any) -> str | None:
    return "conv LoRA layers have no GGUF mapping in llama.cpp" if "conv" in f.kinds else None


def _cpp_scale(f: OutputFacts, v: Any) -> str | None:
    if f.use_rslora:
        return "use_rslora: llama.cpp scales every pair by lora_alpha/rank, not lora_alpha/sqrt(rank)"
    if f.alpha_pattern:
        return "alpha_pattern: llama.cpp stores one lora_alpha and ignores per-module alphas"
    return None


_PEFT_LOAD = "peft/tuners/lora/model.py LoraModel._create_and_replace (get_pattern_key)"
_VLLM_HELPER = "vllm/lora/peft_helper.py PEFTHelper"
_CPP_CONVERT = "convert_lora_to_gguf.py LoraModel.get_tensors"
_CPP_RUNTIME = "src/llama-adapter.cpp llama_adapter_lora_init_impl"

RULES: tuple[Rule, ...] = (
    Rule("peft.format", "peft", "peft/utils/save_and_load.py load_peft_weights (adapter_model.safetensors) + "
         "peft/config.py PeftConfigMixin.from_pretrained (adapter_config.json)", "all", _format_mlx),
    Rule("vllm.format", "vllm", "vllm/lora/models.py LoRAModel.from_local_checkpoint (adapter_model.safetensors, "
         "adapter_config.json)", "all", _format_mlx),
    Rule("llama_cpp.format", "llama_cpp", "convert_lora_to_gguf.py (reads adapter_config.json + "
         "adapter_model.safetensors)", "all", _format_mlx),
    Rule("vllm.rank_pattern_legacy", "vllm", _VLLM_HELPER + ".__post_init__ (one lora_alpha/r)", "< 0.33.0",
         _vllm_uniform_legacy),
    Rule("vllm.modules_to_save", "vllm", _VLLM_HELPER + "._validate_features", "all (heads allowed >= 0.33.0)",
         _vllm_modules_to_save),
    Rule("vllm.dora", "vllm", _VLLM_HELPER + "._validate_features", "all", _vllm_dora),
    Rule("vllm.lora_bias", "vllm", _VLLM_HELPER + "._validate_features / validate_legal", "all", _vllm_bias),
    Rule("vllm.conv", "vllm", "vllm/lora/utils.py from_layer (no conv LoRA layer class)", "all", _vllm_conv),
    Rule("vllm.max_lora_rank", "vllm", _VLLM_HELPER + ".validate_legal; vllm/config/lora.py LoRAConfig", "all",
         _vllm_max_rank),
    Rule("llama_cpp.non_lora_tensor", "llama_cpp", _CPP_CONVERT, "all", _cpp_other_tensors),
    Rule("llama_cpp.norm_dropped", "llama_cpp", _CPP_CONVERT + " + " + _CPP_RUNTIME, "all", _cpp_norms),
    Rule("llama_cpp.dora", "llama_cpp", _CPP_CONVERT, "all", _cpp_dora),
    Rule("llama_cpp.lora_bias", "llama_cpp", _CPP_CONVERT, "all", _cpp_bias),
    Rule("llama_cpp.conv", "llama_cpp", "convert_hf_to_gguf.py ModelBase.map_tensor_name (no conv mapping)", "all", _cpp_conv),
    Rule("llama_cpp.scale", "llama_cpp", "src/llama-adapter.h llama_adapter_lora_weight::get_scale", "all",
         _cpp_scale),
    # MoE expert LoRA (PEFT target_parameters stacks), gradience.engines.experts
    Rule("vllm.experts_pair", "vllm", _experts.SOURCE_VLLM_STACK, _experts.VERSIONS_VLLM, _experts.vllm_expert_pair),
    Rule("vllm.experts_layout", "vllm", _experts.SOURCE_VLLM_STACK + " + vllm/lora/layers/fused_moe.py set_lora",
         _experts.VERSIONS_VLLM, _experts.vllm_expert_layout),
    Rule("llama_cpp.experts", "llama_cpp", _experts.SOURCE_CPP, "all (as read)", _experts.cpp_experts),
)
# The claim each engine makes when no row fails (the row id is reported as the passing rule).
OK_CLAIMS: dict[str, tuple[str, str, str]] = {
    "peft": ("peft.rank_pattern", _PEFT_LOAD,
             "PEFT reads rank_pattern/alpha_pattern and scales each module by its alpha/r_i, which the factors "
             "were written for"),
    "vllm": ("vllm.rank_pattern", _VLLM_HELPER + ".get_rank_and_scaling", ""),
    "llama_cpp": ("llama_cpp.rank_from_tensor", _CPP_RUNTIME,
                  "llama.cpp takes each module's rank from its tensors and scales by lora_alpha/rank, which "
                  "matches the written factors"),
}


def _vllm_ok_reason(f: OutputFacts, version: Any, label: str) -> str:
    top = _vllm.next_allowed_max_lora_rank(f.max_rank)
    serve = f"serve with --max-lora-rank {top}" + (f" (the next allowed value >= rank {f.max_rank})"
                                                    if top != f.max_rank else "")
    if f.uniform:
        return f"one rank everywhere (r={f.max_rank}); {serve}"
    return (f"vLLM {label} reads rank_pattern/alpha_pattern (PEFTHelper.get_rank_and_scaling, PEFT's matching) "
            f"and scales each module by its own alpha/r_i; {serve}")


def version_label(engine: str, version: str | None) -> str:
    if engine == "vllm":
        if version in (None, "", _vllm.CURRENT):
            return ">= " + ".".join(map(str, _vllm.PATTERN_RELEASE))
        return str(version)
    return version or "current"


def parse_engine_versions(specs: Mapping[str, str] | None) -> dict[str, Any]:
    """Validated engine versions (``{"vllm": "0.10.2"}``); raises ValueError naming a bad entry."""
    parsed: dict[str, Any] = {}
    for engine, text in (specs or {}).items():
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r} (one of {', '.join(ENGINES)})")
        parsed[engine] = _vllm.parse_version(text) if engine == "vllm" else text
    return parsed


def evaluate(facts: OutputFacts, engine_versions: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """{engine: {ok, reason, rules, version}} for ``peft``, ``vllm`` and ``llama_cpp``.

    ``engine_versions`` (e.g. ``{"vllm": "0.10.2"}``) picks the rows for an older engine; by default the
    verdict is for the current releases, and ``version`` says which range that is.
    """
    versions = parse_engine_versions(engine_versions)
    out: dict[str, dict[str, Any]] = {}
    for engine in ENGINES:
        raw = (engine_versions or {}).get(engine)
        label = version_label(engine, raw)
        fired = [(rule, reason) for rule in RULES if rule.engine == engine
                 for reason in [rule.fails(facts, versions.get(engine))] if reason]
        notes = _experts.caveats(facts, engine)
        if fired:
            out[engine] = {"ok": False, "reason": "; ".join(reason for _, reason in fired),
                           "rules": [rule.id for rule, _ in fired], "version": label}
        else:
            rule_id, _source, reason = OK_CLAIMS[engine]
            if engine == "vllm":
                reason = _vllm_ok_reason(facts, versions.get("vllm"), label) + _experts.vllm_ok_note(facts)
                rule_id = "vllm.rank_pattern" if _vllm.reads_patterns(versions.get("vllm")) else "vllm.uniform"
            out[engine] = {"ok": True, "reason": reason, "rules": [rule_id], "version": label}
        if notes:  # additive key: what the sources read do not settle for this adapter (expert stacks)
            out[engine]["caveats"] = notes
    return out


def rule_sources() -> dict[str, dict[str, str]]:
    """{rule id: {engine, source, versions}} for every row and passing claim (for reports and docs)."""
    rows = {r.id: {"engine": r.engine, "source": r.source, "versions": r.versions} for r in RULES}
    for engine, (rule_id, source, _reason) in OK_CLAIMS.items():
        rows[rule_id] = {"engine": engine, "source": source, "versions": "all" if engine != "vllm" else ">= 0.33.0"}
    rows["vllm.uniform"] = {"engine": "vllm", "source": _VLLM_HELPER + ".__post_init__", "versions": "< 0.33.0"}
    return rows


# -- name mapping: does each LoRA pair land on a base weight under the engine's naming? (verify, issue 20) ----
@dataclass(frozen=True)
class MappingRule:
    """How an engine finds the base weight of a LoRA pair; ``verify --peft-dir --base-model --engine`` applies it
    to every pair (gradience.verify.mapping) and cites the row when a pair does not resolve."""

    id: str
    engine: str
    source: str
    versions: str
    claim: str


MAPPING_RULES: tuple[MappingRule, ...] = (
    MappingRule("peft.module_path", "peft",
                "peft/utils/save_and_load.py set_peft_model_state_dict; peft/tuners/tuners_utils.py inject_adapter",
                "all", "layers are created by target_modules, weights loaded by full key "
                       "(base_model.model.<module path>); a key whose path the model lacks is left at its init (B = 0: "
                       "the base is served) with only a missing-keys warning"),
    MappingRule("vllm.module_path", "vllm",
                "vllm/lora/utils.py parse_fine_tuned_lora_name; vllm/lora/models.py LoRAModel.from_local_checkpoint",
                "all", "base_model.model. is stripped and the rest must equal a LoRA-capable module path of the "
                       "served model (after the model's hf_to_vllm_mapper); a path the model lacks is never applied "
                       "(vLLM issues 48019, 55193: the base is served)"),
    MappingRule("vllm.packed_modules", "vllm", "vllm/model_executor/models/*: packed_modules_mapping", "all",
                "q/k/v_proj are served stacked in qkv_proj and gate/up_proj in gate_up_proj"),
    MappingRule("llama_cpp.tensor_name", "llama_cpp",
                "convert_lora_to_gguf.py LoraModel.modify_tensors + gguf TensorNameMap; src/llama-adapter.cpp "
                "llama_adapter_lora_init_impl", "all",
                "each pair is named <GGUF base tensor>.lora_a/.lora_b; a name the model lacks stops the load "
                "(\"does not exist in base model\"), a shape that differs too (\"has incorrect shape\")"),
)

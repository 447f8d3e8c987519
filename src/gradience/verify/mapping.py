"""``verify --peft-dir --base-model [--engine]`` without ``--merged``: will every LoRA pair land on a base weight?

Each pair is resolved the way the engine resolves it (rows of :data:`gradience.engines.table.MAPPING_RULES`):
PEFT and vLLM by the full module path (``base_model.model.`` stripped; vLLM serves q/k/v and gate/up stacked in
its packed modules), llama.cpp by the GGUF tensor name its converter gives the weight. A path found only after
adding or dropping a wrapper prefix (the UDR's matcher, :class:`gradience.udr.names.BaseNameIndex`) is a warning
for PEFT (it loads onto the model class the adapter was trained with) and an error for vLLM (the module is never
adapted and the base is served). The engine's rank limit and the rows of the engine table that fire for the
adapter's features (DoRA, modules_to_save, rsLoRA ...) are listed with their sources.
"""

from __future__ import annotations

from typing import Any

from gradience.adapter.model import LoadedAdapter, LoraPair
from gradience.engines import evaluate, facts_from_config, rule_sources
from gradience.engines import llama_cpp as cpp
from gradience.engines import vllm as vllm_facts
from gradience.engines.table import MAPPING_RULES
from gradience.errors import InputError
from gradience.issues import Issue
from gradience.udr.names import BaseNameIndex
from gradience.verify import SCHEMA

ENGINE_CHOICES = ("peft", "vllm", "llama.cpp")
_TABLE_KEY = {"peft": "peft", "vllm": "vllm", "llama.cpp": "llama_cpp"}
_RULE = {r.id: r for r in MAPPING_RULES}


def _rule_ref(rule_id: str) -> dict[str, str]:
    rule = _RULE[rule_id]
    return {"rule": rule.id, "source": rule.source}


def _packed(name: str) -> str | None:
    leaf = name.rsplit(".", 1)[-1]
    for packed, parts in vllm_facts.PACKED_MODULES.items():
        if leaf in parts:
            return name[: len(name) - len(leaf)] + packed
    return None


def _shape_problem(pair: LoraPair, shape: tuple[int, ...]) -> str | None:
    from gradience.udr.measure import weight_fits

    if weight_fits(pair.kind, shape, pair.d_out, pair.d_in):
        return None
    return (f"the base weight has shape {list(shape)} but the factors make a ({pair.d_out}, {pair.d_in}) update "
            "(wrong base model, or a different size of the same family)")


def _resolve(pair: LoraPair, engine: str, index: BaseNameIndex, shapes: dict[str, tuple[int, ...]],
             cpp_names: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"name": pair.name, "peft_key": pair.peft_prefix, "r": pair.r, "kind": pair.kind}
    match = index.match(pair.name)
    rule_id = {"peft": "peft.module_path", "vllm": "vllm.module_path", "llama.cpp": "llama_cpp.tensor_name"}[engine]
    row.update(_rule_ref(rule_id))
    if match.tensor is None:
        detail = (f"several base weights fit ({', '.join(match.candidates[:3])})" if match.how == "ambiguous"
                  else "no base weight has this module path, with or without a wrapper prefix")
        row.update(status="error", base_tensor=None, detail=detail)
        return row
    row["base_tensor"] = match.tensor
    problem = _shape_problem(pair, shapes[match.tensor])
    if problem is not None:
        row.update(status="error", detail=problem)
        return row
    if engine == "llama.cpp":
        gguf_name, why = cpp_names(match.tensor)
        row["engine_name"] = gguf_name
        if gguf_name is None:
            row.update(status="error", detail=why)
            return row
    elif engine == "vllm":
        packed = _packed(pair.name)
        row["engine_name"] = packed or pair.name
        if packed is not None:
            row["packed_rule"] = "vllm.packed_modules"
    else:
        row["engine_name"] = pair.name
    if match.how == "suffix":
        where = match.tensor[: -len(".weight")]
        if engine == "vllm":
            row.update(status="error", detail=f"the served model names this module {where}; vLLM matches the full "
                                              "path, so this pair would never be applied (the base is served)")
            return row
        if engine == "peft":
            row.update(status="warning", detail=f"the base checkpoint names it {where}: PEFT loads the weights only "
                                                "onto the model class whose module path is the adapter's")
            return row
    row.update(status="ok", detail="resolves to a base weight of the right shape")
    return row


def _llama_cpp_namer(base_spec: str) -> Any:
    """checkpoint name -> (GGUF name or None, why not): the converter's mapping for this base's architecture."""
    from gradience.export.gguf import gguf_arch, gguf_base_name, import_gguf, read_base_facts

    gguf = import_gguf("gradience verify --engine llama.cpp")
    _tensors, facts, _display = read_base_facts(base_spec)
    tensor_map = gguf.get_tensor_name_map(gguf_arch(gguf, facts.arch), facts.n_blocks)

    def name(checkpoint: str) -> tuple[str | None, str]:
        if facts.tied_embeddings and cpp.is_lm_head(checkpoint):
            return None, "the base ties lm_head to the token embedding: llama.cpp has no output weight to adapt"
        mapped = gguf_base_name(tensor_map, checkpoint)
        return mapped, (f"no GGUF name for {checkpoint} in llama.cpp's tensor map for {facts.arch}"
                        if mapped is None else "")
    return name


def verify_mapping(loaded: LoadedAdapter, base_spec: str, engine: str = "peft") -> dict[str, Any]:
    """The ``gradience.verify/v1`` document of the adapter's mapping onto a base model under one engine."""
    from gradience.udr.base import BaseWeights
    from gradience.udr.resolve import resolve_base

    if engine in ("llama_cpp", "llamacpp"):
        engine = "llama.cpp"
    if engine not in ENGINE_CHOICES:
        raise InputError(f"--engine must be one of {', '.join(ENGINE_CHOICES)}, not {engine!r}")
    weights = BaseWeights(resolve_base(base_spec, allow_download=False))
    shapes = {n: t.shape for n, t in weights.tensors.items()}
    index = BaseNameIndex(shapes)
    namer = _llama_cpp_namer(base_spec) if engine == "llama.cpp" else None
    rows = [_resolve(pair, engine, index, shapes, namer) for pair in loaded.pairs]
    resolved = [r for r in rows if r["status"] != "error"]
    if not resolved:
        raise InputError(f"none of the adapter's {len(rows)} LoRA module(s) resolves to a weight of this base "
                         f"model under {engine}'s naming (first: {rows[0]['name']}: {rows[0]['detail']}); "
                         "is this the right base model?", weights.resolved.display)
    return _document(loaded, engine, weights.resolved.display, rows)


def _document(loaded: LoadedAdapter, engine: str, base_display: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    key = _TABLE_KEY[engine]
    facts = facts_from_config(loaded.config, [p.r for p in loaded.pairs], kinds={p.kind for p in loaded.pairs},
                              non_lora_names=loaded.non_lora.names, dora=any(p.dora for p in loaded.pairs))
    verdict = evaluate(facts)[key]
    sources = rule_sources()
    features = [{"rule": rid, "source": sources.get(rid, {}).get("source")} for rid in verdict["rules"]]
    issues: list[Issue] = []
    errors = [r["name"] for r in rows if r["status"] == "error"]
    warnings = [r["name"] for r in rows if r["status"] == "warning"]
    if errors:
        issues.append(Issue("unmapped_module", f"{len(errors)} of {len(rows)} LoRA module(s) do not resolve to a base "
                                               f"weight under {engine}'s naming: " + ", ".join(errors[:5]),
                            "error", modules=errors))
    if warnings:
        issues.append(Issue("wrapper_prefix", f"{len(warnings)} module(s) resolve only through a wrapper prefix: "
                                              + ", ".join(warnings[:5]), "warning", modules=warnings))
    if not verdict["ok"]:
        hint = ("; gradience export --to gguf bakes each module's own scale into its factors"
                if "llama_cpp.scale" in verdict["rules"] else "")
        if any(rule.endswith(".format") for rule in verdict["rules"]) and loaded.peft_dir:
            src = loaded.peft_dir.rstrip("/") or loaded.peft_dir
            hint += f"; here: gradience compress {src} --out {src}-peft --format peft"
        issues.append(Issue("engine_unsupported", f"{engine}: {verdict['reason']}{hint}", "error",
                            extra={"rules": verdict["rules"]}))
    max_r = max((p.r for p in loaded.pairs), default=0)
    limits: dict[str, Any] = {"max_rank": max_r}
    if engine == "vllm":
        limits["max_lora_rank_values"] = list(vllm_facts.MAX_LORA_RANKS)
        limits["serve_with_max_lora_rank"] = vllm_facts.next_allowed_max_lora_rank(max_r)
    return {
        "schema": SCHEMA, "mode": "mapping", "engine": engine, "base_model": base_display,
        "peft_dir": loaded.peft_dir, "ok": not errors and verdict["ok"],
        "summary": {"modules": len(rows), "resolved": len(rows) - len(errors), "errors": len(errors),
                    "warnings": len(warnings)},
        "engine_verdict": {**verdict, "features": features}, "limits": limits,
        "rules": [{"rule": r.id, "source": r.source, "versions": r.versions, "claim": r.claim}
                  for r in MAPPING_RULES if r.engine == key],
        "modules": rows, "issues": [i.to_dict() for i in loaded.issues + issues],
    }

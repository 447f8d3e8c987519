"""What a LoRA config's target modules cover (attention, MLP, embeddings), by the one module classifier of
SPEC §2: bare names, module paths, PEFT regexes and ``all-linear``. Used by ``check``'s target rules."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gradience.config.coerce import looks_like_regex
from gradience.modules import classify_module

# PEFT's special value meaning every linear layer except the output head.
ALL_LINEAR = "all-linear"
ATTENTION_EXAMPLES = "q_proj,k_proj,v_proj,o_proj (Llama-style), c_attn (GPT-2), query,value (BERT)"
MLP_EXAMPLES = "gate_proj,up_proj,down_proj (Llama-style), c_fc,c_proj (GPT-2), intermediate.dense (BERT)"


@dataclass
class TargetAnalysis:
    """What the target modules cover, by the one module classifier of SPEC §2."""

    targets: list[str] | None
    types: dict[str, str] = field(default_factory=dict)  # target -> attn|mlp|embed|other|attn+mlp
    unrecognized: list[str] = field(default_factory=list)

    @property
    def has_attn(self) -> bool:
        return any("attn" in t for t in self.types.values())

    @property
    def has_mlp(self) -> bool:
        return any("mlp" in t for t in self.types.values())

    @property
    def empty(self) -> bool:
        return not self.targets


# Bare names PEFT matches in both blocks (it matches any module path ending in the name): GPT-2's
# ``attn.c_proj`` and ``mlp.c_proj``; BERT's ``attention.output.dense``, ``intermediate.dense``, ``output.dense``.
AMBIGUOUS_BARE_TARGETS: dict[str, str] = {"c_proj": "attn+mlp", "dense": "attn+mlp"}
# ... except in architectures whose only bare ``dense`` is the attention output (Falcon, Bloom, GPT-NeoX, Phi).
_DENSE_IS_ATTENTION_MODELS = ("falcon", "bloom", "neox", "pythia", "phi")


def _classify_target(target: str, model_name: str | None = None) -> str:
    bare = target.strip().lower()
    if bare == ALL_LINEAR:
        return "attn+mlp"
    if bare == "dense" and model_name and any(m in model_name.lower() for m in _DENSE_IS_ATTENTION_MODELS):
        return "attn"
    if bare in AMBIGUOUS_BARE_TARGETS:
        return AMBIGUOUS_BARE_TARGETS[bare]
    if looks_like_regex(target):
        return _classify_regex(target)
    return classify_module(target)


def _expand_alternations(pattern: str, limit: int = 64) -> list[str]:
    """``mlp\\.(up|down)_proj`` -> ``mlp\\.up_proj``, ``mlp\\.down_proj`` (simple groups only, bounded)."""
    out = [pattern]
    group = re.compile(r"\(\??:?([A-Za-z0-9_|]+)\)")
    for _ in range(8):
        expanded = []
        for text in out:
            m = group.search(text)
            if m is None:
                expanded.append(text)
                continue
            expanded += [text[:m.start()] + alt + text[m.end():] for alt in m.group(1).split("|")]
        if expanded == out:
            break
        out = expanded[:limit]
    return out


def _classify_regex(pattern: str) -> str:
    """A PEFT regex target: classify the module names and containers it mentions, by the one classifier
    (``.*(q_proj|v_proj)$`` -> attn, ``.*mlp\\.(up|down)_proj`` -> mlp)."""
    kinds: set[str] = set()
    for candidate in _expand_alternations(pattern):
        for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", candidate):
            # A word is either a leaf (q_proj) or a container (mlp, self_attn): probe both readings.
            kinds |= {classify_module(word), classify_module(f"{word}.child")}
    found = sorted(kinds & {"attn", "mlp", "embed"})
    return "+".join(found) if found else "other"


def analyze_targets(targets: list[str] | None, model_name: str | None = None) -> TargetAnalysis:
    """Classify each target (bare name, module path, PEFT regex or ``all-linear``)."""
    analysis = TargetAnalysis(targets=None if targets is None else list(targets))
    for target in targets or []:
        kind = _classify_target(target, model_name)
        analysis.types[target] = kind
        if kind == "other":
            analysis.unrecognized.append(target)
    return analysis

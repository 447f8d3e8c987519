"""``verify --gguf``: does a llama.cpp LoRA GGUF (ours or ``convert_lora_to_gguf.py``'s) compute PEFT's ΔW?

The file is read with the ``gguf`` package's reader; each adapter module's pair is found under the name the
converter gives it, and llama.cpp's ΔW = (alpha / rank) · B_g·A_g (``llama_adapter_lora_weight::get_scale``, rank
from the tensor) is compared with PEFT's s·B·A from the factors (thin QRs of the stacked factors, never the dense
matrix). The applied scale c = ⟨X, Y⟩ / ‖X‖² names a converter's scale mistake (1/√r for an rsLoRA adapter
converted with alpha/r).
Without ``--base-model`` the Llama q/k row permutation's head count is inferred as the one that fits best.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from gradience.adapter.model import LoadedAdapter, LoraPair
from gradience.adapter.pairs import rank_bound_problem
from gradience.engines import llama_cpp as cpp
from gradience.errors import InputError
from gradience.export.gguf import BaseModelFacts, gguf_base_name, import_gguf, permute_rows, read_base_facts
from gradience.io.textfile import regular_file_stat
from gradience.issues import Issue
from gradience.policy.thresholds import VERIFY_GGUF_REL_TOL_F32, VERIFY_SCALE_ABS_TOL, VERIFY_UNIT_ROUNDOFF
from gradience.textfmt import safe_text
from gradience.udr.names import BaseNameIndex
from gradience.verify import SCHEMA
from gradience.verify.verdict import named_ratios

_BLOCK = re.compile(r"^blk\.(\d+)\.")
_MAX_LISTED = 20


class GgufAdapter:
    """A LoRA GGUF as llama.cpp loads it: metadata checks, then lora_a/lora_b pairs by base tensor name."""

    def __init__(self, path: Path) -> None:
        gguf = import_gguf("gradience verify --gguf")
        self.path = path
        self._gguf = gguf
        # stat first: the reader's own words for these are a Python exception ("cannot mmap an empty file")
        st = regular_file_stat(path, "the GGUF", missing="cannot read: no such file")
        if st.st_size == 0:
            raise InputError("empty file (0 bytes): not a GGUF", path)
        try:
            reader = gguf.GGUFReader(str(path), "r")
        except FileNotFoundError:
            raise InputError("cannot read: no such file", path) from None
        except Exception as exc:  # the reader raises ValueError/struct/IndexError on malformed files
            raise InputError(f"not a valid GGUF file ({type(exc).__name__}: {safe_text(str(exc), max_len=200)})",
                             path) from None
        self.fields = {k: _field_value(f) for k, f in reader.fields.items()}
        self.arch = str(self.fields.get("general.architecture", ""))
        self.general_type = self.fields.get(cpp.KV_GENERAL_TYPE)
        self.adapter_type = self.fields.get(cpp.KV_ADAPTER_TYPE)
        alpha = self.fields.get(cpp.KV_LORA_ALPHA, 0.0)
        self.alpha = float(alpha) if isinstance(alpha, (int, float)) else 0.0
        self.pairs: dict[str, dict[str, Any]] = {}
        self.other: list[str] = []
        for t in reader.tensors:
            name = str(t.name)
            for suffix, side in ((cpp.LORA_A_SUFFIX, "a"), (cpp.LORA_B_SUFFIX, "b")):
                if name.endswith(suffix):
                    self.pairs.setdefault(name[: -len(suffix)], {})[side] = t
                    break
            else:
                self.other.append(name)
        if not self.pairs:
            # a model GGUF (or anything else without LoRA pairs): a table of "missing" rows would bury this
            raise InputError(f"not a LoRA adapter GGUF (general.type {self.general_type!r}, no "
                             f"{cpp.LORA_A_SUFFIX}/{cpp.LORA_B_SUFFIX} tensors): pass the adapter GGUF written by "
                             "`gradience export --to gguf` or llama.cpp's convert_lora_to_gguf.py", path)

    def problems(self) -> list[str]:
        """What makes llama_adapter_lora_init_impl refuse the file (metadata and pairing)."""
        out = []
        if self.general_type != "adapter":
            out.append(f"general.type is {self.general_type!r}, llama.cpp expects 'adapter'")
        if self.adapter_type != "lora":
            out.append(f"adapter.type is {self.adapter_type!r}, llama.cpp expects 'lora'")
        half = [n for n, p in self.pairs.items() if len(p) != 2]
        if half:
            out.append(f"LoRA tensor pair(s) missing one component: {', '.join(half[:3])}")
        unexpected = [n for n in self.other if not n.endswith(cpp.RUNTIME_SKIPPED_SUFFIX)]
        if unexpected:
            out.append(f"tensor(s) with an unexpected suffix (llama.cpp refuses the file): {', '.join(unexpected[:3])}")
        return out

    def factors(self, base_name: str) -> tuple[np.ndarray, np.ndarray, str]:
        """(A_g (r, d_in), B_g (d_out, r), dtype name) in float64, token_embd's A transposed back."""
        pair = self.pairs[base_name]
        a, dtype_a = self._array(pair["a"])
        b, dtype_b = self._array(pair["b"])
        if cpp.is_token_embd(base_name):
            a = a.T
        return a, b, dtype_a if dtype_a == dtype_b else f"{dtype_a}/{dtype_b}"

    def _array(self, tensor: Any) -> tuple[np.ndarray, str]:
        qtype = self._gguf.GGMLQuantizationType(int(tensor.tensor_type))
        data = np.asarray(tensor.data)
        if qtype not in (self._gguf.GGMLQuantizationType.F32, self._gguf.GGMLQuantizationType.F16):
            from gguf.quants import dequantize

            data = dequantize(data, qtype)
        shape = tuple(int(d) for d in reversed(list(tensor.shape)))  # ne order -> numpy order
        if len(shape) != 2 or data.size != shape[0] * shape[1]:
            raise InputError(f"tensor {tensor.name} is not a 2-D LoRA factor (shape {list(tensor.shape)})", self.path)
        return np.asarray(data, np.float64).reshape(shape), qtype.name


def _field_value(field: Any) -> Any:
    try:
        return field.contents()
    except Exception:  # an array or odd type we do not need
        return None


def _compare_factors(a1: np.ndarray, b1: np.ndarray, s1: float, a2: np.ndarray, b2: np.ndarray, s2: float
                     ) -> tuple[float, float]:
    """(‖X − Y‖_F / ‖X‖_F, ⟨X, Y⟩ / ‖X‖²) for X = s1·B1·A1, Y = s2·B2·A2, from thin QRs of the stacked factors:
    X − Y = [s1·B1, −s2·B2] · [A1; A2] and ‖Q_L R_L (Q_R R_R)ᵀ‖_F = ‖R_L R_Rᵀ‖_F, so no dense d_out × d_in matrix
    and no cancellation between ‖X‖² and ‖Y‖² (a Gram-trace difference loses everything below ~1e-8)."""
    def norm_of(left: np.ndarray, right: np.ndarray) -> float:
        r_l: np.ndarray = np.linalg.qr(left, mode="r")  # type: ignore[assignment]
        r_r: np.ndarray = np.linalg.qr(right.T, mode="r")  # type: ignore[assignment]
        return float(np.linalg.norm(r_l @ r_r.T))

    x_norm = norm_of(s1 * b1, a1)
    if x_norm == 0.0:
        return norm_of(s2 * b2, a2), 0.0
    diff = norm_of(np.hstack([s1 * b1, -s2 * b2]), np.vstack([a1, a2]))
    xy = s1 * s2 * float(np.sum((b1.T @ b2) * (a1 @ a2.T)))
    return diff / x_norm, xy / (x_norm * x_norm)


def _tolerance(dtype: str) -> float:
    u = {"F16": VERIFY_UNIT_ROUNDOFF["F16"], "BF16": VERIFY_UNIT_ROUNDOFF["BF16"]}.get(dtype)
    if dtype == "F32":
        return VERIFY_GGUF_REL_TOL_F32
    return 4 * u if u is not None else 4 * 2.0**-7  # quantized (q8_0 ...): about 8 bits


def _head_candidates(d_out: int) -> list[int | None]:
    return [None] + [h for h in range(1, d_out + 1) if d_out % h == 0 and (d_out // h) % 2 == 0]


def _compare_module(pair: LoraPair, ggufa: GgufAdapter, gguf_name: str, permute: list[int | None]
                    ) -> dict[str, Any]:
    a_g, b_g, dtype = ggufa.factors(gguf_name)
    row: dict[str, Any] = {"name": pair.name, "gguf_name": gguf_name, "r": pair.r, "peft_scale": pair.scale,
                           "dtype": dtype}
    a, b = pair.load_factors()
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    pair.release()
    if a_g.shape[1] != pair.d_in or b_g.shape[0] != pair.d_out or a_g.shape[0] != b_g.shape[1]:
        row.update(verdict="mismatch", detail=f"GGUF factors A {list(a_g.shape)}, B {list(b_g.shape)} do not fit "
                                              f"the module (d_out={pair.d_out}, d_in={pair.d_in})")
        return row
    rank_g = b_g.shape[1]
    bomb = rank_bound_problem(rank_g, pair.d_in, pair.d_out)
    if bomb is not None:  # refused before any r×r work
        row.update(verdict="mismatch", detail=f"GGUF pair rank: {bomb}")
        return row
    scale_g = cpp.runtime_scale(ggufa.alpha, rank_g)
    best: tuple[float, float, int | None] | None = None
    for heads in permute:
        b_perm = b64 if heads is None else permute_rows(b64, heads)
        rel, c = _compare_factors(a64, b_perm, pair.scale, a_g, b_g, scale_g)
        if best is None or rel < best[0]:
            best = (rel, c, heads)
    assert best is not None
    rel, c, heads = best
    row.update(gguf_rank=rank_g, llama_cpp_scale=scale_g, applied_scale=c, rel_error=rel,
               rows_permuted_heads=heads, tolerance=_tolerance(dtype))
    if rel <= row["tolerance"]:
        row.update(verdict="exact", detail="llama.cpp computes PEFT's ΔW for this module")
        return row
    ratios = named_ratios(pair.r, pair.scale, pair.alpha, None)
    hit = min(ratios, key=lambda x: abs(c - x.value), default=None)
    copied = scale_g / pair.scale if pair.scale else None   # B_g·A_g = B·A: the factors copied, scale not baked
    if copied is not None and abs(c - copied) <= max(VERIFY_SCALE_ABS_TOL, 0.02 * abs(copied)):
        label = f"; {hit.label}" if hit is not None and abs(hit.value - copied) <= 1e-9 * abs(copied) else ""
        row.update(verdict="wrong_scale", detail=(
            f"llama.cpp applies {c:.4g}x PEFT's ΔW: the factors were copied without PEFT's own scale (as "
            f"convert_lora_to_gguf.py does), so llama.cpp applies alpha/rank = {scale_g:.4g} where PEFT applies "
            f"{pair.scale:.4g}{label}"))
    elif hit is not None and abs(c - hit.value) <= max(VERIFY_SCALE_ABS_TOL, 0.02 * abs(hit.value)):
        row.update(verdict="wrong_scale", detail=f"llama.cpp applies {c:.4g}x PEFT's ΔW: {hit.label}")
    else:
        row.update(verdict="mismatch", detail=f"ΔW differs from PEFT's by {rel:.3g} (relative), applied scale "
                                              f"{c:.4g}")
    return row


def _base_misfit(pair: LoraPair, index: BaseNameIndex, base_tensors: dict[str, tuple[int, ...]]) -> str | None:
    """Why the module's update cannot apply to the given base (None when it can): llama.cpp checks the LoRA
    tensors' shapes against the model's at load time, so an adapter for another size must not pass as exact."""
    from gradience.udr.layout import weight_fits

    name = index.match(pair.name).tensor
    if name is None:
        return "no weight of the base model matches this module (is it the base the adapter was trained on?)"
    shape = base_tensors[name]
    if not weight_fits(pair.kind, shape, pair.d_out, pair.d_in):
        return (f"the base weight {name} has shape {list(shape)} but the factors make a ({pair.d_out}, "
                f"{pair.d_in}) update (wrong base model, or another size of the same family)")
    return None


def verify_gguf(loaded: LoadedAdapter, gguf_path: str, base_spec: str | None = None) -> dict[str, Any]:
    """The ``gradience.verify/v1`` document comparing a GGUF LoRA with the PEFT adapter, module by module."""
    gguf = import_gguf("gradience verify --gguf")
    path = Path(gguf_path)
    ggufa = GgufAdapter(path)
    facts: BaseModelFacts | None = None
    index: BaseNameIndex | None = None
    base_display = None
    base_tensors: dict[str, tuple[int, ...]] | None = None
    if base_spec is not None:
        base_tensors, facts, base_display = read_base_facts(base_spec)
        index = BaseNameIndex(base_tensors)
        if facts.arch != ggufa.arch:
            raise InputError(f"the GGUF is for architecture {ggufa.arch!r} but the base model is {facts.arch!r} "
                             "(llama.cpp refuses: 'model arch and LoRA arch mismatch')", path)
    arch_enum = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == ggufa.arch), None)
    if arch_enum is None:
        raise InputError(f"unknown general.architecture {ggufa.arch!r}", path)
    blocks = [int(m.group(1)) for n in ggufa.pairs if (m := _BLOCK.match(n))]
    n_blocks = facts.n_blocks if facts is not None else (max(blocks) + 1 if blocks else 1)
    tensor_map = gguf.get_tensor_name_map(arch_enum, n_blocks)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for pair in loaded.pairs:
        checkpoint = pair.name + ".weight"
        unfit = None
        if index is not None and base_tensors is not None:
            unfit = _base_misfit(pair, index, base_tensors)
            checkpoint = index.match(pair.name).tensor or checkpoint
        gguf_name = gguf_base_name(tensor_map, checkpoint)
        if unfit is not None:
            if gguf_name is not None:
                seen.add(gguf_name)   # its pair is accounted for here, not "extra"
            rows.append({"name": pair.name, "gguf_name": gguf_name, "r": pair.r, "peft_scale": pair.scale,
                         "verdict": "mismatch", "detail": unfit})
            continue
        if gguf_name is None or gguf_name not in ggufa.pairs or len(ggufa.pairs[gguf_name]) != 2:
            rows.append({"name": pair.name, "gguf_name": gguf_name, "r": pair.r, "peft_scale": pair.scale,
                         "verdict": "missing", "detail": "no lora_a/lora_b pair for this module in the GGUF: "
                                                         "llama.cpp serves the base weight here"})
            continue
        seen.add(gguf_name)
        if facts is not None:
            heads = cpp.qk_permute_heads(facts.arch, checkpoint, facts.n_head, facts.n_head_kv)
            permute: list[int | None] = [heads]
        elif ggufa.arch in cpp.PERMUTE_QK_ARCHS and checkpoint.endswith(("q_proj.weight", "k_proj.weight")):
            permute = _head_candidates(pair.d_out)   # head count unknown without the base config: best fit
        else:
            permute = [None]
        rows.append(_compare_module(pair, ggufa, gguf_name, permute))
    return _document(loaded, ggufa, rows, seen, base_display, inferred=facts is None)


def _document(loaded: LoadedAdapter, ggufa: GgufAdapter, rows: list[dict[str, Any]], seen: set[str],
              base_display: str | None, *, inferred: bool) -> dict[str, Any]:
    issues = [Issue("gguf_refused", p, "error") for p in ggufa.problems()]
    extra = sorted(n for n, p in ggufa.pairs.items() if n not in seen and len(p) == 2)
    if extra:
        issues.append(Issue("extra_in_gguf", f"{len(extra)} pair(s) in the GGUF match no module of the adapter: "
                                             + ", ".join(extra[:5]), "error"))
    bad = [r["name"] for r in rows if r["verdict"] != "exact"]
    if bad:
        issues.append(Issue("gguf_differs", f"{len(bad)} of {len(rows)} module(s) do not compute PEFT's ΔW in "
                                            "llama.cpp: " + ", ".join(bad[:5]), "error", modules=bad))
    if inferred and any(r.get("rows_permuted_heads") for r in rows):
        issues.append(Issue("heads_inferred", "the q/k row permutation's head count was inferred from the factors "
                                              "(pass --base-model to use config.json's)", "info"))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    return {
        "schema": SCHEMA, "mode": "gguf", "gguf": str(ggufa.path), "peft_dir": loaded.peft_dir,
        "base_model": base_display, "architecture": ggufa.arch, "lora_alpha": ggufa.alpha,
        "ok": not bad and not extra and not ggufa.problems(),
        "summary": {"modules": len(rows), "exact": counts.get("exact", 0), "not_exact": len(bad),
                    "verdicts": counts, "extra_in_gguf": len(extra)},
        "modules": rows, "extra_in_gguf": extra[:_MAX_LISTED],
        "issues": [i.to_dict() for i in loaded.issues + issues],
    }

"""``gradience export --to gguf``: a llama.cpp LoRA GGUF whose ΔW equals PEFT's for every module.

llama.cpp stores one ``adapter.lora.alpha`` and scales each pair by alpha / rank, with the rank read from the
tensor (``llama_adapter_lora_weight::get_scale``). PEFT's scale is per module (rank_pattern, alpha_pattern) and
alpha / √r with rsLoRA, which ``convert_lora_to_gguf.py`` ignores (it writes the config's lora_alpha and copies the
factors). Here each module's own scale s_i is baked into its B: B' = (s_i · r_i / alpha) · B, so that
alpha / r_i · B'·A = s_i · B·A exactly as PEFT computes it. Names, tensor layout, the token-embedding transpose and
the Llama q/k row permutation follow the converter (:mod:`gradience.engines.llama_cpp`); the file is written with
the ``gguf`` package (optional extra ``gguf``), to a temporary name beside the output, then renamed into place.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradience.adapter.model import LoadedAdapter, LoraPair
from gradience.engines import llama_cpp as cpp
from gradience.errors import InputError, MissingDependencyError
from gradience.io.textfile import read_json_file
from gradience.udr.names import BaseNameIndex

SCHEMA = "gradience.export/v1"
OUTTYPES = ("f32", "f16", "bf16")
_MAX_CONFIG_BYTES = 16 * 1024 * 1024
_F32_MAX = float(np.finfo(np.float32).max)


def import_gguf(purpose: str) -> Any:
    try:
        import gguf
    except ImportError:
        raise MissingDependencyError("gguf", "gguf", purpose) from None
    return gguf


@dataclass(frozen=True)
class BaseModelFacts:
    """What the GGUF names depend on: llama.cpp's architecture, the block count and the head counts."""

    arch: str                     # llama.cpp architecture name (general.architecture)
    hf_arch: str
    n_blocks: int
    n_head: int | None
    n_head_kv: int | None
    tied_embeddings: bool


def base_model_facts(config: dict[str, Any], where: str | Path) -> BaseModelFacts:
    """From the base's ``config.json`` (``text_config`` of a VL model first, as the converter reads it)."""
    sub = config.get("text_config")
    text: dict[str, Any] = sub if isinstance(sub, dict) else {}
    archs = text.get("architectures") or config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise InputError("config.json has no 'architectures' list: the GGUF tensor names depend on it", where)
    hf_arch = archs[0]
    arch = cpp.HF_ARCHITECTURES.get(hf_arch)
    if arch is None:
        raise InputError(f"architecture {hf_arch!r} is not one export knows the llama.cpp names of (supported: "
                         f"{', '.join(sorted(cpp.HF_ARCHITECTURES))})", where)

    def hparam(*keys: str) -> int | None:
        for src in (text, config):
            for key in keys:
                value = src.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
        return None

    n_blocks = hparam("num_hidden_layers", "n_layer", "n_layers")
    if n_blocks is None:
        raise InputError("config.json has no num_hidden_layers", where)
    n_head = hparam("num_attention_heads", "n_head", "n_heads")
    n_head_kv = hparam("num_key_value_heads", "n_head_kv", "n_kv_heads") or n_head
    tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    return BaseModelFacts(arch, hf_arch, n_blocks, n_head, n_head_kv, tied)


def refusal(loaded: LoadedAdapter) -> str | None:
    """Why this adapter cannot be expressed as a llama.cpp LoRA at all, with what to do instead; None if it can."""
    dora = [p.name for p in loaded.pairs if p.dora]
    if dora or loaded.config.get("use_dora") is True:
        return ("DoRA adapters cannot be written as a GGUF LoRA: llama.cpp applies B·A only, not DoRA's magnitude "
                "rescaling; merge the adapter into the base (PEFT merge_and_unload) and convert the merged model")
    extra = [n for n in loaded.non_lora.names if cpp.BASE_LAYER_SKIPPED not in n]  # base copies: skipped
    if extra:
        shown = ", ".join(extra[:3])
        return (f"the adapter carries non-LoRA tensors ({shown}{' ...' if len(extra) > 3 else ''}: "
                "modules_to_save copies, heads or lora_B biases), which a GGUF LoRA cannot hold (llama.cpp loads only "
                "lora_a/lora_b pairs); merge the adapter into the base (PEFT merge_and_unload) and convert the "
                "merged model")
    conv = [p.name for p in loaded.pairs if p.kind == "conv"]
    if conv:
        return f"conv LoRA layers ({conv[0]}) have no GGUF mapping in llama.cpp"
    return None


def gguf_arch(gguf: Any, name: str) -> Any:
    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise InputError(f"the installed gguf package does not know architecture {name!r}; upgrade gguf")


def gguf_base_name(tensor_map: Any, checkpoint_name: str) -> str | None:
    """The GGUF name of a base checkpoint weight, after the converter's language-model prefix rewrite."""
    name = cpp.strip_lm_prefix(checkpoint_name)
    mapped: str | None = tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
    return mapped


@dataclass
class PlannedPair:
    pair: LoraPair
    checkpoint_name: str
    gguf_name: str              # e.g. blk.0.attn_q.weight
    permute_heads: int | None   # rows of B permuted as llama.cpp's Llama q/k (None: no permutation)
    factor: float               # B' = factor · B
    where: str | None = None    # the adapter file, for errors found while writing


def plan_pairs(loaded: LoadedAdapter, base_tensors: dict[str, tuple[int, ...]], facts: BaseModelFacts,
               gguf: Any, alpha: float) -> list[PlannedPair]:
    """Resolve every pair to its GGUF name (errors name the module), with its bake factor and permutation."""
    from gradience.udr.layout import weight_fits

    tensor_map = gguf.get_tensor_name_map(gguf_arch(gguf, facts.arch), facts.n_blocks)
    index = BaseNameIndex(base_tensors)
    where = loaded.adapter_weights_path or loaded.peft_dir  # errors name the adapter file ("<file>: <problem>")
    planned: list[PlannedPair] = []
    for pair in loaded.pairs:
        match = index.match(pair.name)
        if match.tensor is None:
            raise InputError(f"module {pair.name} resolves to no weight of the base model ({match.how}); "
                             "is this the base model the adapter was trained on?", where)
        name = match.tensor
        shape = base_tensors[name]
        if not weight_fits(pair.kind, shape, pair.d_out, pair.d_in):
            # A GGUF whose factors do not fit the base is refused by llama.cpp at load time (or worse, not):
            # the same shape rule verify's mapping mode and the UDR use (gradience.udr.layout).
            raise InputError(f"module {pair.name}: the base weight {name} has shape {list(shape)} but the factors "
                             f"make a ({pair.d_out}, {pair.d_in}) update (wrong base model, or a different size "
                             "of the same family)", where)
        if facts.tied_embeddings and cpp.is_lm_head(name):
            raise InputError(f"module {pair.name}: the base ties lm_head to the token embedding, and llama.cpp "
                             "has no separate output weight to adapt (convert_lora_to_gguf.py stops here too)", where)
        gguf_name = gguf_base_name(tensor_map, name)
        if gguf_name is None:
            raise InputError(f"module {pair.name} ({name}) has no GGUF name in llama.cpp's tensor map for "
                             f"architecture {facts.arch}", where)
        permute = cpp.qk_permute_heads(facts.arch, name, facts.n_head, facts.n_head_kv)
        if permute is not None and pair.d_out % (2 * permute):
            raise InputError(f"module {pair.name}: {pair.d_out} output rows do not split into {permute} heads "
                             "of even size (config.json head counts do not fit the weight)", where)
        factor = pair.scale * pair.r / alpha
        planned.append(PlannedPair(pair, name, gguf_name, permute, factor, where))
    return planned


def permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """LlamaModel.permute (convert_hf_to_gguf.py) on the rows of a (d_out, ...) array: within each head the two
    rope halves are interleaved. The converter applies it to a LoRA's B only (LoraTorchTensor.permute)."""
    d = rows.shape[0]
    return rows.reshape(n_head, 2, d // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_factors(p: PlannedPair) -> tuple[np.ndarray, np.ndarray]:
    """(lora_a, lora_b) as numpy arrays in the converter's layout (float64)."""
    a, b = p.pair.load_factors()
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64) * p.factor
    p.pair.release()
    if not (np.isfinite(a64).all() and np.isfinite(b64).all()):
        # llama.cpp would load it and compute NaN/inf logits; nothing downstream names the module.
        raise InputError(f"module {p.pair.name}: its factors hold NaN or infinite values; a GGUF of them would make "
                         "every output of the adapted model non-finite", p.where)
    if p.permute_heads is not None:
        b64 = permute_rows(b64, p.permute_heads)
    if cpp.is_token_embd(p.gguf_name):
        return np.ascontiguousarray(a64.T), b64      # llama.cpp: token_embd's lora_a is stored transposed
    return a64, b64


def _encode(gguf: Any, arr: np.ndarray, outtype: str, name: str, where: str | None = None) -> tuple[np.ndarray, Any]:
    """(array, raw_dtype) for GGUFWriter.add_tensor."""
    with np.errstate(over="ignore"):
        f32 = np.ascontiguousarray(arr, np.float32)
    if not np.all(np.isfinite(f32)):  # a scale baked into B can overflow float32 (and bf16, its range)
        raise InputError(f"{name}: values exceed the float32 range once the module's scale is baked in", where)
    if outtype == "f32":
        return f32, None
    if outtype == "f16":
        with np.errstate(over="ignore"):
            out = np.ascontiguousarray(arr, np.float16)
        if not np.all(np.isfinite(out)):
            raise InputError(f"{name}: values exceed the float16 range; export with --outtype f32 or bf16", where)
        return out, None
    from gguf.quants import quantize

    return quantize(f32, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16


def export_alpha(config: dict[str, Any]) -> float:
    """The alpha stored in the file: the config's lora_alpha (plain adapters then keep their factors bit for bit),
    1.0 when it is missing, zero or not a number (llama.cpp reads alpha 0 as "scale 1")."""
    alpha = config.get("lora_alpha")
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0 \
            and alpha <= _F32_MAX:  # the file stores it as float32: a larger one would be read back as inf
        return float(alpha)
    return 1.0


def read_base_facts(base_spec: str) -> tuple[dict[str, tuple[int, ...]], BaseModelFacts, str]:
    from gradience.udr.base import BaseWeights
    from gradience.udr.resolve import resolve_base

    resolved = resolve_base(base_spec, allow_download=False)
    config_path = resolved.root / "config.json"
    config = read_json_file(config_path, what="model config", max_bytes=_MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise InputError("config.json is not a JSON object", config_path)
    facts = base_model_facts(config, config_path)
    weights = BaseWeights(resolved)
    return {n: t.shape for n, t in weights.tensors.items()}, facts, resolved.display


def export_gguf(loaded: LoadedAdapter, base_spec: str, out: str | os.PathLike[str], *, outtype: str = "f32",
                force: bool = False) -> dict[str, Any]:
    """Write ``out`` (a llama.cpp LoRA GGUF) and return the ``gradience.export/v1`` summary."""
    gguf = import_gguf("gradience export --to gguf")
    if outtype not in OUTTYPES:
        raise InputError(f"--outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}")
    why = refusal(loaded)
    if why is not None:
        raise InputError(f"cannot export: {why}", loaded.peft_dir or loaded.adapter_weights_path)
    target = Path(out)
    if target.is_dir():  # before "exists": --force cannot help here
        raise InputError("output is a directory; name the .gguf file to write", target)
    if os.path.lexists(target) and not force:  # lexists: a dangling symlink is an existing name too
        raise InputError("output exists; pass --force to replace it", target)
    base_tensors, facts, base_display = read_base_facts(base_spec)
    alpha = export_alpha(loaded.config)
    planned = plan_pairs(loaded, base_tensors, facts, gguf, alpha)
    _write(gguf, target, facts.arch, alpha, planned, outtype)
    rescaled = [p.pair.name for p in planned if not math.isclose(p.factor, 1.0, rel_tol=1e-12)]
    return {
        "schema": SCHEMA, "to": "gguf", "out": str(target), "base_model": base_display, "peft_dir": loaded.peft_dir,
        "architecture": facts.arch, "outtype": outtype, "lora_alpha": alpha, "tensors": 2 * len(planned),
        "modules": [{"name": p.pair.name, "gguf_name": p.gguf_name, "r": p.pair.r, "peft_scale": p.pair.scale,
                     "llama_cpp_scale": cpp.runtime_scale(alpha, p.pair.r), "b_factor": p.factor,
                     "rows_permuted": p.permute_heads is not None} for p in planned],
        "rescaled_modules": len(rescaled),
    }


def _tensors(gguf: Any, planned: list[PlannedPair], outtype: str) -> Iterator[tuple[str, np.ndarray, Any]]:
    for p in planned:
        a, b = gguf_factors(p)
        name_a, name_b = cpp.gguf_pair_names(p.gguf_name)
        yield (name_a, *_encode(gguf, a, outtype, name_a, p.where))
        yield (name_b, *_encode(gguf, b, outtype, name_b, p.where))


def _write(gguf: Any, target: Path, arch: str, alpha: float, planned: list[PlannedPair], outtype: str) -> None:
    import shutil

    from gradience.jsonio import make_staging_dir

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(target, "export")
    tmp = staging / target.name  # written with a plain open(): the mode any file the user creates gets
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_type(gguf.GGUFType.ADAPTER)                       # general.type = "adapter"
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")            # adapter.type = "lora"
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)      # adapter.lora.alpha
        for name, data, raw_dtype in _tensors(gguf, planned, outtype):
            if raw_dtype is None:
                writer.add_tensor(name, data)
            else:
                writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=raw_dtype)  # shape in bytes
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, target)
    except OSError as exc:
        raise InputError(f"cannot write: {exc.strerror or exc}", target) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)

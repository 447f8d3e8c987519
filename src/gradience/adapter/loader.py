"""Public entry points: load an adapter from disk (or from an in-memory state dict) into a ``LoadedAdapter``.

Loading reads the config and the weight headers only; factor data is read pair by pair by
``LoraPair.load_factors()``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradience.adapter.config import CONFIG_FILENAME, read_adapter_config
from gradience.adapter.discovery import existing_dir, find_weights, resolve_adapter_dir
from gradience.adapter.mlx import MLX_WEIGHTS, build_mlx_pairs, is_mlx_config, mlx_config_view, mlx_parameters
from gradience.adapter.model import LoadedAdapter
from gradience.adapter.pairs import build_pairs
from gradience.adapter.sources import MappingSource, SafetensorsSource, TensorSource, torch_pickle_source
from gradience.errors import InputError
from gradience.io.textfile import exists, is_dir, is_file, os_problem, regular_file_stat
from gradience.issues import Issue

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_NO_PAIRS = "no LoRA pairs found (looked for keys with .lora_A./.lora_B. or lora_embedding_A/_B)"


def open_weights(path: Path) -> TensorSource:
    """A tensor source for a weights file: safetensors, a sharded-safetensors index, or a PyTorch pickle."""
    name = path.name.lower()
    if name.endswith(".index.json"):
        return SafetensorsSource.sharded(path)
    if name.endswith(".safetensors"):
        return SafetensorsSource.single(path)
    if name.endswith(_PICKLE_SUFFIXES):
        return torch_pickle_source(path)
    # Unknown extension: zip archives and pickles are torch files; anything else must be safetensors.
    regular_file_stat(path, "weights file")  # never open() a FIFO or a device
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise InputError(f"cannot read weights: {os_problem(exc)}", path) from None
    if magic.startswith((b"PK\x03\x04", b"\x80")):
        return torch_pickle_source(path)
    return SafetensorsSource.single(path)


def _explicit_weights(weights: str | os.PathLike[str]) -> Path:
    path = Path(weights)
    if not exists(path):
        raise InputError("weights file not found", path)
    if is_dir(path):
        found = find_weights(path)
        if found is None:
            raise InputError("directory holds no adapter weights (adapter_model.safetensors / .bin / .pt)", path)
        return found
    regular_file_stat(path, "weights file")  # a FIFO or device: refused before anything opens it
    return path


def _not_lora_issue(config: Mapping[str, Any]) -> list[Issue]:
    peft_type = config.get("peft_type")
    if peft_type is None or str(peft_type).upper() == "LORA":
        return []
    return [Issue("not_plain_lora", f"peft_type is {peft_type!r}; only its lora_A/lora_B factor pairs are audited "
                                    "as plain LoRA (ΔW = s·B·A)")]


def _assemble(source: TensorSource, config: dict[str, Any], issues: list[Issue], *, where: str | None,
              peft_dir: str | None, config_path: str | None, weights_path: str | None,
              adapter_name: str | None, key_adapter: str | None = None) -> LoadedAdapter:
    if is_mlx_config(config) or (weights_path is not None and Path(weights_path).name == MLX_WEIGHTS
                                 and not config.get("peft_type")):
        # MLX-LM layout: its own key names and factor orientation; the rest of the tool sees PEFT's view.
        # The config's lora_parameters are checked first, so that their errors name adapter_config.json.
        mlx_parameters(config, config_path or where)
        pairs, non_lora, pair_issues = build_mlx_pairs(source, config, where)
        config = mlx_config_view(config, where)
    else:
        pairs, non_lora, pair_issues = build_pairs(source, config, key_adapter)
    issues = issues + _not_lora_issue(config) + pair_issues
    if not pairs:
        reasons = [i.message for i in issues if i.severity != "info"]
        detail = f"; {'; '.join(reasons)}" if reasons else ""
        raise InputError(f"{_NO_PAIRS}; {non_lora.count} other tensor(s){detail}", where)
    return LoadedAdapter(peft_dir=peft_dir, adapter_config_path=config_path, adapter_weights_path=weights_path,
                         config=config, pairs=pairs, non_lora=non_lora, issues=issues, adapter_name=adapter_name)


def load_adapter(peft_dir: str | None = None, *, adapter_config: str | None = None, weights: str | None = None,
                 adapter_name: str | None = None) -> LoadedAdapter:
    """Load a PEFT LoRA adapter's config and weight headers.

    ``peft_dir`` is searched as SPEC §2 says (the directory, then below it; ``adapter_name`` picks one adapter of
    a multi-adapter directory). Explicit ``adapter_config`` / ``weights`` paths override discovery; without an
    explicit config, ``adapter_config.json`` is taken from the adapter directory (or next to the weights file).
    Raises ``InputError`` naming the file for any input that cannot be used, including one with no LoRA pairs.
    """
    issues: list[Issue] = []
    adapter_dir: Path | None = None
    resolved_name: str | None = None
    if weights is not None:
        weights_path = _explicit_weights(weights)
        if peft_dir is not None:
            adapter_dir = existing_dir(peft_dir)
        config_dir = adapter_dir if adapter_dir is not None else weights_path.parent
    else:
        if peft_dir is not None:
            adapter_dir, resolved_name, issues = resolve_adapter_dir(peft_dir, adapter_name)
        elif adapter_config is not None:
            # say what is missing: the config itself, not the weights that would sit next to it
            regular_file_stat(adapter_config, "adapter config", missing="adapter config not found")
            adapter_dir = Path(adapter_config).parent
        else:
            raise InputError("no adapter given: pass a PEFT adapter directory (--peft-dir) or a weights file "
                             "(--weights)")
        found = find_weights(adapter_dir)
        if found is None:
            raise InputError("no adapter weights (adapter_model.safetensors / .bin / .pt) next to the adapter config",
                             adapter_dir)
        weights_path = found
        config_dir = adapter_dir

    if adapter_config is not None:
        config_path: Path | None = Path(adapter_config)
    else:
        candidate = config_dir / CONFIG_FILENAME
        config_path = candidate if is_file(candidate) else None
    config = read_adapter_config(config_path) if config_path is not None else {}

    source = open_weights(weights_path)
    return _assemble(source, config, issues, where=str(weights_path),
                     peft_dir=None if adapter_dir is None else str(adapter_dir),
                     config_path=None if config_path is None else str(config_path),
                     weights_path=str(weights_path), adapter_name=resolved_name)


def adapter_from_state_dict(tensors: Mapping[str, Any], config: Mapping[str, Any] | None, *,
                            adapter_name: str | None = None) -> LoadedAdapter:
    """A ``LoadedAdapter`` over an in-memory state dict (numpy arrays or torch tensors), e.g. during training.

    Pass PEFT's ``get_peft_model_state_dict(model)`` (or the model's state dict; base weights are then counted as
    non-LoRA tensors). ``adapter_name`` keeps only that adapter's factors when keys carry adapter names. Torch
    tensors are converted to float32 numpy only when a pair's factors are loaded.
    """
    source = MappingSource(tensors, origin="state dict")
    if config is not None and not isinstance(config, Mapping) and hasattr(config, "to_dict"):
        config = config.to_dict()  # a peft LoraConfig passed as is
    return _assemble(source, dict(config or {}), [], where=None, peft_dir=None, config_path=None, weights_path=None,
                     adapter_name=adapter_name, key_adapter=adapter_name)

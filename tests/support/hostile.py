"""Builders for the generated hostile-input corpus (issue 9 item 4): every file is made in a tmp dir by code,
nothing is checked in. Each builder writes real files in the formats Gradience reads (safetensors with raw
headers, PEFT adapter dirs, telemetry JSONL, HF cache layouts) with one thing wrong.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from support.synthetic import write_safetensors, write_synthetic_adapter

REPO_ROOT = Path(__file__).resolve().parents[2]
Q = "base_model.model.model.layers.0.self_attn.q_proj"
K = "base_model.model.model.layers.0.self_attn.k_proj"


def raw_safetensors(path: Path, header_bytes: bytes, data: bytes = b"") -> Path:
    """A safetensors file whose header is exactly ``header_bytes`` (not necessarily valid JSON)."""
    path.write_bytes(len(header_bytes).to_bytes(8, "little") + header_bytes + data)
    return path


def header_file(path: Path, header: dict[str, Any], data: bytes) -> Path:
    return raw_safetensors(path, json.dumps(header).encode(), data)


def good_adapter(out: Path, **overrides: Any) -> Path:
    """A one-layer synthetic adapter (q_proj and k_proj, r=4, alpha=8) to mutate."""
    return write_synthetic_adapter(out, layers=1, targets={"q_proj": (16, 16), "k_proj": (16, 16)}, r=4, alpha=8,
                                   config_overrides=overrides or None)


def adapter_with_tensors(out: Path, tensors: dict[str, np.ndarray], config: dict[str, Any] | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "adapter_model.safetensors", tensors)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    cfg.update(config or {})
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def pair(prefix: str, r: int, d_in: int, d_out: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"{prefix}.lora_A.weight": rng.standard_normal((r, d_in)).astype(np.float32),
            f"{prefix}.lora_B.weight": rng.standard_normal((d_out, r)).astype(np.float32)}


def deep_json(depth: int = 100_000) -> bytes:
    return b"[" * depth + b"]" * depth


def synthetic_base(out: Path, d: int = 16) -> Path:
    """A base checkpoint dir for the good adapter (q_proj, k_proj weights of layer 0)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    write_safetensors(out / "model.safetensors", {
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((d, d)).astype(np.float32),
        "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((d, d)).astype(np.float32),
    })
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return out


def telemetry(path: Path, records: list[dict[str, Any] | str], run_id: str = "r1") -> Path:
    """A JSONL log: dict records get the v1 envelope; strings are written as raw lines."""
    lines = []
    for i, rec in enumerate(records):
        if isinstance(rec, str):
            lines.append(rec)
            continue
        full = {"schema": "gradience.vnext.telemetry/v1", "ts": 1.0 + i, "run_id": run_id, "step": i}
        full.update(rec)
        lines.append(json.dumps(full))
    path.write_text("\n".join(lines) + "\n")
    return path


def run_subprocess(args: list[str], timeout: float = 60, env: dict[str, str] | None = None,
                   **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``python -m gradience ARGS`` with a real stdout/stderr (encoding failures show) and a hard timeout."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO_ROOT / "src") + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "gradience", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, errors="backslashreplace", **kwargs)

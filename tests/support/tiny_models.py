"""Tiny real models and real PEFT adapters, built offline from configs (nothing comes from the Hub).

Every builder imports torch/transformers/peft inside the function, writes with the libraries' own
``save_pretrained`` (so files are exactly what users get) and returns the output directory. Each build takes
well under 2 s once torch is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

Arch = Literal["llama", "gpt2", "distilbert"]
Init = Literal["random", "zero", "trained"]

VOCAB_SIZE = 256
# Default LoRA targets per architecture: attention and MLP modules, so both module types are exercised.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # c_proj exists in attn and mlp: a classifier test case
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
}


def _torch_dtype(dtype: str) -> Any:
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, not {dtype!r}") from None


def _save_model(model: Any, out_dir: str | os.PathLike[str], dtype: str, max_shard_size: str | int | None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(_torch_dtype(dtype)).eval()
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **kwargs)
    return out


def make_tiny_llama(out_dir: str | os.PathLike[str], *, dtype: str = "float32",
                    max_shard_size: str | int | None = None, seed: int = 0) -> Path:
    """A 2-layer LlamaForCausalLM (hidden 32, intermediate 64, 4 heads, 2 KV heads so k/v_proj are 32→16)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return _save_model(LlamaForCausalLM(config), out_dir, dtype, max_shard_size)


def make_tiny_gpt2(out_dir: str | os.PathLike[str], *, dtype: str = "float32",
                   max_shard_size: str | int | None = None, seed: int = 0) -> Path:
    """A 2-layer GPT2LMHeadModel (n_embd 32, 4 heads): Conv1D weights stored (d_in, d_out)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=VOCAB_SIZE - 1, eos_token_id=VOCAB_SIZE - 1)
    return _save_model(GPT2LMHeadModel(config), out_dir, dtype, max_shard_size)


def make_tiny_distilbert(out_dir: str | os.PathLike[str], *, seq_cls: bool = False, seed: int = 0) -> Path:
    """A 2-layer DistilBERT (dim 32, hidden 64): bare model, or ForSequenceClassification with 2 labels."""
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, DistilBertModel

    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=64, n_layers=2, n_heads=4, dim=32,
                              hidden_dim=64)
    config.num_labels = 2
    model = DistilBertForSequenceClassification(config) if seq_cls else DistilBertModel(config)
    return _save_model(model, out_dir, "float32", None)


def _load_base(base_dir: str | os.PathLike[str], arch: Arch) -> Any:
    """Load a tiny base saved by the builders above, picking the class from its config."""
    from transformers import (
        DistilBertForSequenceClassification,
        DistilBertModel,
        GPT2LMHeadModel,
        LlamaForCausalLM,
    )

    config = json.loads((Path(base_dir) / "config.json").read_text())
    if arch == "llama":
        cls: Any = LlamaForCausalLM
    elif arch == "gpt2":
        cls = GPT2LMHeadModel
    elif arch == "distilbert":
        seq_cls = any("SequenceClassification" in a for a in config.get("architectures") or [])
        cls = DistilBertForSequenceClassification if seq_cls else DistilBertModel
    else:
        raise ValueError(f"unknown arch {arch!r}")
    return cls.from_pretrained(str(base_dir), dtype="float32")


def _train_a_few_steps(model: Any, arch: Arch, seed: int, steps: int = 8) -> None:
    """A few AdamW steps on random tokens so the LoRA update is non-zero and trained-looking."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, VOCAB_SIZE, (4, 16), generator=gen)
        if arch in ("llama", "gpt2"):
            loss = model(input_ids=ids, labels=ids).loss
        else:
            out = model(input_ids=ids)
            if hasattr(out, "logits"):
                labels = torch.randint(0, 2, (4,), generator=gen)
                loss = torch.nn.functional.cross_entropy(out.logits, labels)
            else:
                loss = out.last_hidden_state.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _lora_config(arch: Arch, *, r: int, alpha: int, targets: Sequence[str] | None, use_rslora: bool,
                 rank_pattern: dict[str, int] | None, alpha_pattern: dict[str, float] | None, use_dora: bool,
                 init: Init, task_type: str | None, modules_to_save: Sequence[str] | None) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets or DEFAULT_TARGETS[arch]), lora_dropout=0.0,
        use_rslora=use_rslora, rank_pattern=dict(rank_pattern or {}), alpha_pattern=dict(alpha_pattern or {}),
        use_dora=use_dora, init_lora_weights=(init != "random"), task_type=task_type,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        fan_in_fan_out=(arch == "gpt2"),  # GPT-2's Conv1D stores weights transposed
    )


def _set_base_name(adapter_dir: Path, base_model_name_or_path: str) -> None:
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_model_name_or_path
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def make_peft_adapter(base_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, arch: Arch,
                      r: int = 8, alpha: int = 16, targets: Sequence[str] | None = None,
                      use_rslora: bool = False, rank_pattern: dict[str, int] | None = None,
                      alpha_pattern: dict[str, float] | None = None, use_dora: bool = False,
                      dtype: str = "float32", init: Init = "random", seed: int = 0, task_type: str | None = None,
                      modules_to_save: Sequence[str] | None = None,
                      base_model_name_or_path: str | None = None) -> Path:
    """A real LoRA adapter: PEFT ``get_peft_model`` on the tiny base at ``base_dir``, then ``save_pretrained``.

    ``init``: "zero" = PEFT's default init (B = 0, an untrained adapter); "random" = both factors random
    (``init_lora_weights=False``); "trained" = default init then a few optimizer steps on random tokens.
    ``dtype="bfloat16"`` casts the PEFT model before saving, so the file holds BF16 factors.
    ``adapter_config.json`` records ``base_model_name_or_path`` (default: ``base_dir``).
    """
    import torch
    from peft import get_peft_model

    model = _load_base(base_dir, arch)
    torch.manual_seed(seed)
    config = _lora_config(arch, r=r, alpha=alpha, targets=targets, use_rslora=use_rslora,
                          rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, use_dora=use_dora, init=init,
                          task_type=task_type, modules_to_save=modules_to_save)
    peft_model = get_peft_model(model, config)
    if init == "trained":
        _train_a_few_steps(peft_model, arch, seed)
    peft_model = peft_model.to(_torch_dtype(dtype))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    _set_base_name(out, base_model_name_or_path if base_model_name_or_path is not None else str(base_dir))
    return out


def make_multi_adapter_dir(base_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                           names: Sequence[str] = ("default", "second"), *, arch: Arch = "llama",
                           ranks: Sequence[int] | None = None, seed: int = 0) -> Path:
    """Several adapters saved by one PEFT ``save_pretrained`` call (PEFT's multi-adapter layout).

    PEFT writes the adapter named "default" at ``out_dir`` itself and every other one in ``out_dir/<name>/``;
    pass names without "default" to get all of them in subfolders. Adapter i has rank ``ranks[i]``
    (default 8, 4, 2, ...) so tests can tell them apart; factors are random (non-zero).
    """
    import torch
    from peft import get_peft_model

    if not names:
        raise ValueError("names must not be empty")
    ranks = list(ranks) if ranks is not None else [max(1, 8 >> i) for i in range(len(names))]
    if len(ranks) != len(names):
        raise ValueError("ranks must have one entry per adapter name")
    model = _load_base(base_dir, arch)
    torch.manual_seed(seed)

    def cfg(rank: int) -> Any:
        return _lora_config(arch, r=rank, alpha=2 * rank, targets=None, use_rslora=False, rank_pattern=None,
                            alpha_pattern=None, use_dora=False, init="random", task_type=None, modules_to_save=None)

    peft_model = get_peft_model(model, cfg(ranks[0]), adapter_name=names[0])
    for name, rank in zip(names[1:], ranks[1:], strict=True):
        peft_model.add_adapter(name, cfg(rank))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    for name in names:
        _set_base_name(out if name == "default" else out / name, str(base_dir))
    return out


def make_hf_cache_layout(model_dir: str | os.PathLike[str], cache_root: str | os.PathLike[str],
                         repo_id: str = "org/tiny-llama",
                         revision: str = "abc123def4567890abc123def4567890abc12345") -> Path:
    """Lay ``model_dir`` out as the Hugging Face hub cache does; returns the snapshot directory.

    ``<cache_root>/models--org--tiny-llama/{blobs/<sha256>, snapshots/<revision>/<file> -> ../../blobs/<sha256>,
    refs/main}``. Symlinks as the hub creates them; plain copies where symlinks are unavailable.
    """
    src = Path(model_dir)
    repo = Path(cache_root) / ("models--" + repo_id.replace("/", "--"))
    blobs, snapshot = repo / "blobs", repo / "snapshots" / revision
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = file.relative_to(src)
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        blob = blobs / digest
        if not blob.exists():
            shutil.copyfile(file, blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            link.symlink_to(os.path.relpath(blob, link.parent))
        except OSError:
            shutil.copyfile(blob, link)
    return snapshot


def gpt2_lora_for_trainer(base_dir: str | os.PathLike[str], *, seed: int = 0) -> tuple[Any, Any]:
    """A tiny GPT-2 with LoRA r=4 on c_attn, and ``data(n)``: n random 16-token causal-LM rows (a ``Dataset``).

    The model and data every real-Trainer test (monitor, series) trains; seeded so runs repeat exactly.
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                      lora_dropout=0.0, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size

    def data(n: int) -> Any:
        ids = torch.randint(0, vocab, (n, 16), generator=gen).tolist()
        return Dataset.from_dict({"input_ids": ids, "labels": ids})

    return model, data

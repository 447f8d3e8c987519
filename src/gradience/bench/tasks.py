"""Bench tasks: data, the one base every arm starts from, and per-item evaluation.

Why per item: verdicts use paired statistics, so every arm must be scored on exactly the same items and
the score of each item must be kept (correct 0/1 for classification, mean token NLL or exact match 0/1 for
a causal LM). Why one materialised base: a sequence-classification head is freshly initialised each time a
checkpoint is loaded with ``num_labels``; the bench saves the base (head included, seed fixed) once under
``<output>/base`` so that the probe and every arm start from identical weights.

torch / transformers / peft are imported inside functions (the ``hf`` extra).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradience.bench.config import BenchConfig
from gradience.errors import InputError
from gradience.toy.causal import (
    BUILTIN_CAUSAL_DATASET,
    BUILTIN_CAUSAL_MODEL,
    BUILTIN_CAUSAL_TARGETS,
    CAUSAL_MAX_LENGTH,
    build_tiny_causal_lm,
    generate_tiny_stories,
)
from gradience.toy.model import (
    BUILTIN_MODEL,
    BUILTIN_TARGETS,
    build_builtin_classifier,
    build_word_tokenizer,
    require_hf,
)

BASE_SEED = 0          # the base (and a new classification head) is the same for every seed and arm
DATA_SEED = 0          # data selection is fixed too: seeds vary LoRA init and batch order only
_MAX_TOKENS = 128
# A classification head has one row per label: labels up to 1e9 would allocate gigabytes. Real label sets
# are small (GLUE: 2-3, banking77: 77); beyond this a label column is not class ids.
MAX_LABELS = 10_000


@dataclass
class PreparedTask:
    """Everything an arm needs to train and be evaluated, identical for every arm of a bench."""

    kind: str                       # classification | causal_lm
    model_name: str                 # as configured (hub id, local path or built-in name)
    base_dir: str                   # what arms load the base from (a local dir, or the hub id itself)
    dataset_name: str
    tokenizer: Any
    train_set: list[dict[str, Any]]
    eval_set: list[dict[str, Any]]
    num_labels: int = 2
    default_targets: list[str] | None = None
    eval_prompts: list[str] = field(default_factory=list)
    eval_answers: list[str] = field(default_factory=list)
    torch_dtype: str | None = None  # model.torch_dtype of the config


def _tokenize_classification(tokenizer: Any, texts: list[str], labels: list[int]) -> list[dict[str, Any]]:
    max_length = min(int(getattr(tokenizer, "model_max_length", _MAX_TOKENS) or _MAX_TOKENS), _MAX_TOKENS)
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    return [{"input_ids": ids, "attention_mask": mask, "labels": int(label)}
            for ids, mask, label in zip(enc["input_ids"], enc["attention_mask"], labels, strict=True)]


def _tokenize_causal(tokenizer: Any, texts: list[str]) -> list[dict[str, Any]]:
    max_length = min(int(getattr(tokenizer, "model_max_length", _MAX_TOKENS) or _MAX_TOKENS), _MAX_TOKENS)
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    return [{"input_ids": ids, "attention_mask": mask} for ids, mask in zip(enc["input_ids"], enc["attention_mask"],
                                                                          strict=True)]


def _save_base(model: Any, tokenizer: Any, base_dir: Path) -> None:
    """Write the base atomically (a temp dir renamed into place): a crash never leaves half a base."""
    import shutil

    from gradience.jsonio import make_staging_dir
    from gradience.toy.run import plain_modes

    base_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(base_dir, "tmp")
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        plain_modes(staging)  # safetensors writes 0600 whatever the umask
        os.replace(staging, base_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _load_tokenizer(spec: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(spec), trust_remote_code=False)
    except Exception as exc:
        raise InputError(_load_failure("tokenizer", exc), path=spec) from None
    return tok


def _load_failure(what: str, exc: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = " (offline and not in the local Hugging Face cache?)" if offline else ""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"cannot load {what}{hint}: {type(exc).__name__}: {first}"[:400]


def prepare_task(cfg: BenchConfig, output_dir: Path, *, base: Path | None = None) -> PreparedTask:
    """Load the data and materialise the shared base under ``output_dir/base`` (reused when present).

    ``base``: a saved base checkpoint (``config.json`` + weights) that adapters were trained on, used as is
    (``bench --peft-dir`` evaluates a user's adapter on its own base; nothing is materialised)."""
    base_dir = base if base is not None else output_dir / "base"
    if cfg.model not in (BUILTIN_MODEL, BUILTIN_CAUSAL_MODEL) and not (base_dir / "config.json").is_file():
        from gradience.toy.model import hub_load_kwargs

        hub_load_kwargs(cfg.model, flag="model.name")  # a hub id neither cached nor reachable fails in seconds
    require_hf("the bench")
    if cfg.task_type == "classification":
        return _prepare_classification(cfg, base_dir)
    return _prepare_causal(cfg, base_dir, given=base is not None)


def _prepare_classification(cfg: BenchConfig, base_dir: Path) -> PreparedTask:
    from gradience.toy.dataset import load_text_classification

    try:
        data = load_text_classification(cfg.dataset_spec, seed=DATA_SEED, max_train_samples=cfg.max_train_samples,
                                        max_test_samples=cfg.max_eval_samples)
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. int('positive') of a text label column
        raise InputError(f"labels must be integer class ids 0..N-1 ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120] if str(exc) else ''})", path=cfg.dataset_spec) from None
    if data.num_labels > MAX_LABELS:
        raise InputError(f"the labels run up to {data.num_labels - 1}: a classification head needs one output per "
                         f"label id, at most {MAX_LABELS} here (are the labels class ids 0..N-1?)",
                         path=cfg.dataset_spec)
    # The built-in data is returned whole by the loader: apply the config's (or --smoke's) sizes here too.
    data.train_texts, data.train_labels = _head(data.train_texts, data.train_labels, cfg.max_train_samples)
    data.test_texts, data.test_labels = _head(data.test_texts, data.test_labels, cfg.max_eval_samples)
    builtin = cfg.model == BUILTIN_MODEL
    if not (base_dir / "config.json").is_file():
        import torch

        if builtin:  # the shipped pretrained body when its vocabulary covers the data (issue 18), else random init
            tokenizer, model, _pretrained = build_builtin_classifier(data.train_texts, data.num_labels, BASE_SEED)
        else:
            from transformers import AutoModelForSequenceClassification

            tokenizer = _load_tokenizer(cfg.model)
            torch.manual_seed(BASE_SEED)
            try:
                model = AutoModelForSequenceClassification.from_pretrained(
                    os.path.expanduser(cfg.model), num_labels=data.num_labels, trust_remote_code=False,
                    ignore_mismatched_sizes=True)
            except Exception as exc:
                raise InputError(_load_failure("model", exc), path=cfg.model) from None
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
                model.config.pad_token_id = tokenizer.pad_token_id
        _save_base(model, tokenizer, base_dir)
    if builtin and not _has_tokenizer(base_dir):  # a toy run's saved base holds the model only
        tokenizer = build_builtin_classifier(data.train_texts, data.num_labels, BASE_SEED)[0]
    else:
        tokenizer = _load_tokenizer(str(base_dir))
    return PreparedTask(
        kind="classification", model_name=cfg.model, base_dir=str(base_dir), dataset_name=data.name,
        tokenizer=tokenizer, train_set=_tokenize_classification(tokenizer, data.train_texts, data.train_labels),
        eval_set=_tokenize_classification(tokenizer, data.test_texts, data.test_labels),
        num_labels=data.num_labels, default_targets=list(BUILTIN_TARGETS) if builtin else None,
        torch_dtype=cfg.torch_dtype)


def _has_tokenizer(base_dir: Path) -> bool:
    return any((base_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))


def _head(texts: list[str], labels: list[int], n: int | None) -> tuple[list[str], list[int]]:
    return (texts, labels) if n is None else (texts[:n], labels[:n])


def _causal_texts(cfg: BenchConfig) -> tuple[str, list[str], list[str], list[str], list[str]]:
    """(name, train texts, eval texts, eval prompts, eval answers) of the configured causal-LM data."""
    if cfg.dataset == BUILTIN_CAUSAL_DATASET:
        d = generate_tiny_stories(DATA_SEED)
        n_train = cfg.max_train_samples or len(d.train_texts)
        n_eval = cfg.max_eval_samples or len(d.eval_texts)
        return (d.name, d.train_texts[:n_train], d.eval_texts[:n_eval], d.eval_prompts[:n_eval],
                d.eval_answers[:n_eval])
    from gradience.toy.dataset import load_raw_dataset, looks_like_local_path

    try:
        raw = load_raw_dataset(cfg.dataset_spec)
    except InputError:
        raise
    except Exception as exc:
        hint = "" if looks_like_local_path(cfg.dataset_spec) else " (offline and not in the local cache?)"
        raise InputError(f"cannot load dataset{hint}: {type(exc).__name__}: {exc}"[:400], path=cfg.dataset_spec) from None
    splits = list(raw.keys()) if hasattr(raw, "keys") else ["train"]
    train = raw["train"] if "train" in splits else raw[splits[0]]
    test_name = next((s for s in ("test", "validation", "eval") if s in splits), None)
    if test_name is None:
        held = train.train_test_split(test_size=0.1, seed=DATA_SEED)
        train, test = held["train"], held["test"]
    else:
        test = raw[test_name]
    cols = list(train.column_names)
    text_col = cfg.text_column or next((c for c in ("text", "question", "prompt", "content") if c in cols), None)
    if text_col is None or text_col not in cols:
        raise InputError(f"no text column (set task.text_column; columns are {', '.join(cols)})", path=cfg.dataset_spec)
    answer_col = cfg.answer_column or ("answer" if "answer" in cols else None)

    def texts(split: Any, n: int | None) -> tuple[list[str], list[str], list[str]]:
        n = len(split) if n is None else min(n, len(split))
        part = split.select(range(n))
        prompts = [str(t) for t in part[text_col]]
        answers = [str(a) for a in part[answer_col]] if answer_col else [""] * n
        full = [f"{p} {a}".strip() for p, a in zip(prompts, answers, strict=True)]
        return full, prompts, answers

    train_full, _, _ = texts(train, cfg.max_train_samples)
    eval_full, eval_prompts, eval_answers = texts(test, cfg.max_eval_samples)
    return cfg.dataset_spec, train_full, eval_full, eval_prompts, eval_answers


def _prepare_causal(cfg: BenchConfig, base_dir: Path, given: bool = False) -> PreparedTask:
    name, train_texts, eval_texts, prompts, answers = _causal_texts(cfg)
    builtin = cfg.model == BUILTIN_CAUSAL_MODEL
    if builtin:
        if not (base_dir / "config.json").is_file():
            tokenizer = build_word_tokenizer(train_texts + eval_texts)
            tokenizer.model_max_length = CAUSAL_MAX_LENGTH
            model = build_tiny_causal_lm(len(tokenizer), BASE_SEED, tokenizer.pad_token_id)
            _save_base(model, tokenizer, base_dir)
        base = str(base_dir)
    else:
        base = str(base_dir) if given else cfg.model  # no new head: every arm can load the checkpoint itself
    tokenizer = _load_tokenizer(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return PreparedTask(
        kind="causal_lm", model_name=cfg.model, base_dir=base, dataset_name=name, tokenizer=tokenizer,
        train_set=_tokenize_causal(tokenizer, train_texts), eval_set=_tokenize_causal(tokenizer, eval_texts),
        default_targets=list(BUILTIN_CAUSAL_TARGETS) if builtin else None, eval_prompts=prompts,
        eval_answers=answers, torch_dtype=cfg.torch_dtype)


def load_base_model(task: PreparedTask, device: str = "cpu") -> Any:
    """A fresh copy of the shared base (never remote code)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if task.kind == "classification" else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"num_labels": task.num_labels} if task.kind == "classification" else {}
    dtype = _torch_dtype(task.torch_dtype, device)
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        model = cls.from_pretrained(os.path.expanduser(task.base_dir), trust_remote_code=False, **kwargs)
    except Exception as exc:
        raise InputError(_load_failure("base model", exc), path=task.base_dir) from None
    if task.kind == "classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = task.tokenizer.pad_token_id
    return model.to(_torch_device(device))  # type: ignore[arg-type]


def _torch_dtype(name: str | None, device: str) -> Any:
    """model.torch_dtype as the reference applies it (protocol.py): bf16/fp16 on a GPU, float32 on a CPU."""
    if name is None:
        return None
    import torch

    if name in ("fp32", "float32") or _torch_device(device) == "cpu":
        return torch.float32
    return torch.bfloat16 if name in ("bf16", "bfloat16") else torch.float16


def _torch_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_adapter_model(task: PreparedTask, adapter_dir: str | os.PathLike[str], device: str = "cpu") -> Any:
    """The base with a saved adapter applied (PEFT's own loader: what a user would run)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base_model(task, device), str(adapter_dir), is_trainable=False)
    return model.eval()


def evaluate_per_item(model: Any, task: PreparedTask, cfg: BenchConfig, device: str = "cpu") -> np.ndarray:
    """One score per eval item: correct (0/1) for classification, mean token NLL or exact match for a causal LM."""
    if task.kind == "causal_lm" and cfg.metric == "exact_match":
        return _exact_match_items(model, task, cfg, device)
    import torch

    dev = _torch_device(device)
    out: list[float] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(task.eval_set), cfg.eval_batch_size):
            batch_items = task.eval_set[start:start + cfg.eval_batch_size]
            feats = [{"input_ids": it["input_ids"], "attention_mask": it["attention_mask"]} for it in batch_items]
            batch = task.tokenizer.pad(feats, return_tensors="pt")
            batch = {k: v.to(dev) for k, v in batch.items()}
            logits = model(**batch).logits.float()
            if task.kind == "classification":
                labels = torch.tensor([it["labels"] for it in batch_items], device=dev)
                out.extend((logits.argmax(dim=-1) == labels).float().cpu().tolist())
            else:
                out.extend(_per_item_nll(logits, batch["input_ids"], batch["attention_mask"]))
    return np.asarray(out, dtype=np.float64)


def _per_item_nll(logits: Any, input_ids: Any, attention_mask: Any) -> list[float]:
    """Mean next-token negative log-likelihood per sequence (padding excluded)."""
    import torch

    shift_logits = logits[:, :-1, :]
    shift_labels = input_ids[:, 1:]
    mask = attention_mask[:, 1:].float()
    nll = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_labels, reduction="none")
    per_item = (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return [float(x) for x in per_item.cpu().tolist()]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def answer_matches(generated: str, reference: str) -> bool:
    """Exact match of a generation against a reference answer.

    gsm8k-style references (``... #### 42``) compare the last number of the generation with the number after
    ``####``; otherwise the first generated word is compared with the reference's first word (case-folded).
    """
    ref = reference.split("####")[-1].strip() if "####" in reference else reference.strip()
    ref_numbers = _NUMBER.findall(ref)
    if "####" in reference and ref_numbers:
        gen_numbers = _NUMBER.findall(generated)
        return bool(gen_numbers) and gen_numbers[-1].replace(",", "") == ref_numbers[-1].replace(",", "")
    gen_words, ref_words = generated.strip().split(), ref.split()
    return bool(gen_words) and bool(ref_words) and gen_words[0].casefold() == ref_words[0].casefold()


def _exact_match_items(model: Any, task: PreparedTask, cfg: BenchConfig, device: str) -> np.ndarray:
    import torch

    dev = _torch_device(device)
    tok = task.tokenizer
    scores: list[float] = []
    model.eval()
    with torch.no_grad():
        for prompt, answer in zip(task.eval_prompts, task.eval_answers, strict=True):
            enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
            ids = enc["input_ids"]
            if tok.cls_token_id is not None and task.model_name == BUILTIN_CAUSAL_MODEL:
                ids = torch.cat([torch.tensor([[tok.cls_token_id]]), ids], dim=1)
            ids = ids.to(dev)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
            text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
            scores.append(1.0 if answer_matches(text, answer) else 0.0)
    return np.asarray(scores, dtype=np.float64)


def metric_summary(per_item: np.ndarray, task: PreparedTask, cfg: BenchConfig) -> dict[str, float]:
    """The metrics reported beside the bench metric (eval loss and ppl for a causal LM)."""
    if task.kind == "classification" or cfg.metric == "exact_match":
        return {cfg.metric: float(per_item.mean()) if per_item.size else math.nan, "n": float(per_item.size)}
    loss = float(per_item.mean()) if per_item.size else math.nan
    return {"eval_loss": loss, "ppl": math.exp(loss) if math.isfinite(loss) else math.nan, "n": float(per_item.size)}

"""The toy LoRA run behind ``examples/vnext/toy_lora_run.py`` and ``gradience demo``.

It is a real Hugging Face ``Trainer`` run with :class:`gradience.integrations.hf.GradienceCallback`, so the
golden path exercises the integration exactly as a user's run would. Offline by default: the built-in tiny
model and tokenizer are built locally and the data ships with the package. Outputs under ``out``:

- ``run.jsonl``: telemetry (run_start, train_steps, train and test evals, lora_audit, run_end);
- ``peft/``: ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT ``save_pretrained``);
- ``training/training_args.json``: ``TrainingArguments.to_json_string()``;
- ``base/``: the built-in base model (``config.json`` + ``model.safetensors``), so UDR can be computed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradience.errors import InputError
from gradience.io.textfile import os_problem
from gradience.jsonio import make_staging_dir
from gradience.toy.dataset import BUILTIN_DATASET, TextClassificationData, load_text_classification
from gradience.toy.model import BUILTIN_MODEL, MAX_LENGTH, hub_load_kwargs, load_model, require_hf

TASK_PROFILE = "easy_classification"
BASE_DIRNAME = "base"  # where the built-in base model is saved (gradience.report finds it there)
DEVICES = ("cpu", "cuda", "mps", "auto")


@dataclass
class ToyRunConfig:
    """Every knob of the toy run; the defaults are the golden path's."""

    out: str = "runs/toy"
    device: str = "cpu"
    model: str = BUILTIN_MODEL
    dataset: str = BUILTIN_DATASET
    max_steps: int = 100
    r: int = 8
    alpha: float = 16.0
    lr: float = 1e-3                   # LoRA on the pretrained tiny base: inside check's band (issue 18)
    targets: list[str] | None = None   # None: the model's default targets
    seed: int = 42
    batch_size: int = 16
    eval_steps: int = 25
    logging_steps: int = 5
    train_eval_samples: int = 200
    max_train_samples: int | None = 2000
    max_eval_samples: int | None = 500
    telemetry_allow_text: bool = False
    audit: bool = True
    quiet: bool = True                 # silence transformers' progress bars and info logs
    progress: bool = False             # one line on stderr per logging step (the script and the demo turn it on)


@dataclass
class ToyRunResult:
    out: Path
    run_file: Path
    peft_dir: Path
    training_dir: Path
    run_id: str | None
    model_name: str
    dataset_name: str
    train_seconds: float
    test_metrics: dict[str, float] = field(default_factory=dict)
    train_metrics: dict[str, float] = field(default_factory=dict)
    base_dir: Path | None = None       # the built-in base model, saved for UDR (None for a hub model)


def next_commands(out: str | os.PathLike[str]) -> list[str]:
    """The three golden-path commands for a toy run written to ``out`` (the seed's, for ``runs/toy``)."""
    o = Path(out).as_posix()
    return [
        f"gradience check --task sst2 --peft-dir {o}/peft --training-dir {o}/training",
        f"gradience monitor {o}/run.jsonl --verbose",
        f"gradience audit --peft-dir {o}/peft --top-wasteful 10",
    ]


def _tokenize(tokenizer: Any, texts: Sequence[str], labels: Sequence[int]) -> list[dict[str, Any]]:
    max_length = min(int(getattr(tokenizer, "model_max_length", MAX_LENGTH) or MAX_LENGTH), 128)
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    return [{"input_ids": ids, "attention_mask": mask, "labels": int(label)}
            for ids, mask, label in zip(enc["input_ids"], enc["attention_mask"], labels, strict=True)]


def _accuracy(eval_pred: Any) -> dict[str, float]:
    import numpy as np

    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    predictions = np.asarray(logits).argmax(axis=-1)
    labels = np.asarray(labels)
    return {"accuracy": float((predictions == labels).mean()), "n": int(labels.size)}


def _training_args(cfg: ToyRunConfig, training_dir: Path) -> Any:
    from transformers import TrainingArguments

    device_kwargs: dict[str, Any] = {"use_cpu": True} if cfg.device == "cpu" else {}
    return TrainingArguments(
        output_dir=str(training_dir),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=cfg.lr,
        weight_decay=0.0,
        warmup_steps=max(1, cfg.max_steps // 10),
        lr_scheduler_type="linear",
        logging_steps=cfg.logging_steps,
        eval_strategy="steps",
        eval_steps=cfg.eval_steps,
        save_strategy="no",
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        disable_tqdm=cfg.quiet,
        dataloader_num_workers=0,
        **device_kwargs,
    )


def _check_device(device: str) -> None:
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})", path="--device")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA is not available on this machine; use --device cpu", path="--device")
    if device == "mps" and not torch.backends.mps.is_available():
        raise InputError("MPS is not available on this machine; use --device cpu", path="--device")


def plain_modes(root: Path) -> None:
    """Give every file and directory under ``root`` the mode a plain ``open``/``mkdir`` would (umask applied):
    the pinned safetensors creates its files 0600, which hides adapters from a serving account."""
    from gradience.jsonio import _umask_mode

    file_mode, dir_mode = _umask_mode(0o666), _umask_mode(0o777)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, dir_mode)


def save_adapter(model: Any, peft_dir: Path, **save_kwargs: Any) -> None:
    """PEFT ``save_pretrained`` into a temp dir, then swap it in, so ``peft/`` is never half-written
    (the same for the base model's ``save_pretrained`` into ``base/``, with no keyword arguments)."""
    peft_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(peft_dir, "tmp")
    try:
        try:
            model.save_pretrained(str(staging), **save_kwargs)
        except OSError as exc:
            raise InputError(f"cannot write: {os_problem(exc)}", peft_dir) from None
        except Exception as exc:
            # safetensors reports a full disk as SafetensorError("... I/O error: No space left on device (os
            # error 28)"): an output problem of the user's, not a bug; anything else is re-raised as it is
            text = str(exc)
            if "I/O error" not in text and "os error" not in text:
                raise
            raise InputError(f"cannot write: {text.rpartition('I/O error: ')[2][:200]}", peft_dir) from None
        plain_modes(staging)
        previous = None
        if peft_dir.exists():
            previous = peft_dir.with_name(f".{peft_dir.name}.old.{os.getpid()}")
            os.replace(peft_dir, previous)
        os.replace(staging, peft_dir)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def run_toy(cfg: ToyRunConfig | None = None) -> ToyRunResult:
    """Train the toy LoRA classifier with the Gradience callback; returns paths and final metrics."""
    cfg = cfg or ToyRunConfig()
    if cfg.max_steps < 1:
        raise InputError("must be at least 1", path="--max-steps")
    if cfg.r < 1:
        raise InputError("LoRA rank must be a positive integer", path="--r")
    if cfg.model != BUILTIN_MODEL:
        hub_load_kwargs(cfg.model)  # a hub id neither cached nor reachable fails now, not after the imports
    # Data before the heavy imports: a mistyped --dataset fails at once (the built-in data needs no extra).
    data: TextClassificationData = load_text_classification(
        cfg.dataset, seed=cfg.seed, max_train_samples=cfg.max_train_samples,
        max_test_samples=cfg.max_eval_samples)
    require_hf("the toy run")
    _check_device(cfg.device)

    import transformers
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import DataCollatorWithPadding, Trainer

    from gradience.integrations.hf import GradienceCallback, GradienceCallbackConfig
    from gradience.jsonio import atomic_write_text

    if cfg.quiet:
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # "Writing model shards" bars of save_pretrained
    transformers.set_seed(cfg.seed)
    loaded = load_model(cfg.model, data.num_labels, data.train_texts, cfg.seed)
    base_dir: Path | None = None
    if cfg.model == BUILTIN_MODEL:
        # The built-in base exists nowhere else: saved beside the run (before LoRA wraps it; LoRA never
        # changes base weights) so that `gradience report` / `audit --base-model` can compute UDR. ~1 MB.
        base_dir = Path(cfg.out) / BASE_DIRNAME
        save_adapter(loaded.model, base_dir)
    targets = cfg.targets or loaded.default_targets
    alpha: Any = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha  # PEFT types alpha as int
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.r, lora_alpha=alpha, lora_dropout=0.0,
                      target_modules=targets, modules_to_save=loaded.head_modules)
    try:
        with warnings.catch_warnings():
            # peft 0.21 probes a property transformers 5 deprecated; nothing the user can act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(loaded.model, lora)
    except ValueError as exc:  # e.g. targets that match no module, or an architecture PEFT has no default for
        raise InputError(f"cannot apply LoRA: {exc}", path="--targets" if cfg.targets else cfg.model) from exc

    out = Path(cfg.out)
    training_dir = out / "training"
    args = _training_args(cfg, training_dir)
    train_set = _tokenize(loaded.tokenizer, data.train_texts, data.train_labels)
    test_set = _tokenize(loaded.tokenizer, data.test_texts, data.test_labels)
    callback = GradienceCallback(GradienceCallbackConfig(
        output_dir=str(out), model_name=loaded.name, dataset_name=data.name, task_profile=TASK_PROFILE,
        eval_split="test", train_eval_dataset=train_set, train_eval_samples=cfg.train_eval_samples,
        telemetry_allow_text=cfg.telemetry_allow_text, audit_on_train_end=cfg.audit,
        meta={"toy": True, "num_labels": data.num_labels, "test_split": data.test_split}))
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=test_set,
                      data_collator=DataCollatorWithPadding(loaded.tokenizer),
                      compute_metrics=_accuracy, callbacks=[callback])
    callback.attach(trainer)
    if cfg.quiet:
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # with tqdm disabled it would print every log dict
    if cfg.progress:
        trainer.add_callback(_progress_callback(cfg))
    started = time.perf_counter()
    with callback.guard():
        trainer.train()
    seconds = time.perf_counter() - started

    peft_dir = out / "peft"
    # save_embedding_layers=False: LoRA never targets embeddings here, and PEFT's "auto" would look the
    # base model name up on the Hub (the built-in one is not there; the run must stay offline).
    save_adapter(model, peft_dir, save_embedding_layers=False)
    atomic_write_text(training_dir / "training_args.json", args.to_json_string())
    test_metrics = dict(callback.last_eval.get("test", {}))
    train_metrics = dict(callback.last_eval.get("train", {}))
    return ToyRunResult(out=out, run_file=out / "run.jsonl", peft_dir=peft_dir, training_dir=training_dir,
                        run_id=callback.run_id, model_name=loaded.name, dataset_name=data.name,
                        train_seconds=seconds, test_metrics=test_metrics, train_metrics=train_metrics,
                        base_dir=base_dir)


def _progress_callback(cfg: ToyRunConfig) -> Any:
    """A TrainerCallback printing one short line on stderr at the start and at each log / eval step, so a
    user sees the run move (tqdm and the Printer callback are off in quiet mode; their dicts are noise)."""
    import sys

    from transformers import TrainerCallback

    class ToyProgress(TrainerCallback):
        def __init__(self) -> None:
            self.started = time.perf_counter()

        def _say(self, text: str) -> None:
            print(f"toy run: {text}", file=sys.stderr, flush=True)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()
            self._say(f"training {cfg.max_steps} steps on {cfg.device} (model {cfg.model}, dataset {cfg.dataset})")

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            logs = logs or {}
            parts = [f"step {state.global_step}/{state.max_steps}"]
            if isinstance(logs.get("loss"), (int, float)):
                parts.append(f"loss {logs['loss']:.4f}")
            if isinstance(logs.get("eval_accuracy"), (int, float)):
                parts.append(f"test acc {100 * logs['eval_accuracy']:.1f}%")
            if len(parts) > 1:
                self._say("  ".join(parts) + f"  ({time.perf_counter() - self.started:.1f}s)")

    return ToyProgress()


# --- command line (shared by the example script and `gradience demo`) ----------------------------------

def build_arg_parser(prog: str | None = None) -> argparse.ArgumentParser:
    d = ToyRunConfig()
    p = argparse.ArgumentParser(prog=prog, description="Train a tiny LoRA classifier with Gradience telemetry "
                                "(offline by default).")
    add_toy_arguments(p, d)
    return p


def add_toy_arguments(p: argparse.ArgumentParser, d: ToyRunConfig | None = None) -> None:
    d = d or ToyRunConfig()
    p.add_argument("--out", default=d.out, help=f"output directory (default {d.out})")
    p.add_argument("--device", default=d.device, choices=DEVICES, help="cpu (default), cuda, mps or auto")
    p.add_argument("--model", default=d.model,
                   help=f"hub id or local path of a model (default: {BUILTIN_MODEL}, built locally)")
    p.add_argument("--dataset", default=d.dataset,
                   help=f"hub id (e.g. glue/sst2), local dir or data file (default: {BUILTIN_DATASET}, shipped)")
    p.add_argument("--max-steps", type=int, default=d.max_steps)
    p.add_argument("--r", type=int, default=d.r, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=d.alpha, help="LoRA alpha")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    p.add_argument("--targets", default=None,
                   help="comma-separated LoRA target modules (default: the model's attention projections)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--telemetry-allow-text", action="store_true",
                   help="do not redact long strings in the run log")
    p.add_argument("--no-audit", action="store_true", help="skip the train-end LoRA audit event")


def config_from_args(args: argparse.Namespace) -> ToyRunConfig:
    targets = [t.strip() for t in args.targets.replace(" ", ",").split(",") if t.strip()] \
        if args.targets else None
    return ToyRunConfig(out=args.out, device=args.device, model=args.model, dataset=args.dataset,
                        max_steps=args.max_steps, r=args.r, alpha=args.alpha, lr=args.lr, targets=targets,
                        seed=args.seed, telemetry_allow_text=args.telemetry_allow_text,
                        audit=not args.no_audit, progress=True)


def format_result(result: ToyRunResult) -> str:
    """Human summary printed by the script and the demo, ending with the next three commands."""
    def pct(metrics: dict[str, float]) -> str:
        acc = metrics.get("accuracy")
        return "-" if acc is None else f"{100 * acc:.1f}%"

    lines = [
        f"Toy run finished in {result.train_seconds:.1f}s "
        f"(model {result.model_name}, dataset {result.dataset_name})",
        f"  train acc {pct(result.train_metrics)}, test acc {pct(result.test_metrics)}",
        f"  telemetry: {result.run_file}",
        f"  adapter:   {result.peft_dir}",
        f"  training:  {result.training_dir / 'training_args.json'}",
        *([f"  base:      {result.base_dir} (the built-in base model, for UDR)"] if result.base_dir else []),
        "",
        "Next:",
        *(f"  {cmd}" for cmd in next_commands(result.out)),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``examples/vnext/toy_lora_run.py``: errors are one line on stderr and exit 2."""
    import sys

    from gradience.errors import GradienceError

    args = build_arg_parser(prog).parse_args(argv)
    try:
        result = run_toy(config_from_args(args))
    except GradienceError as exc:
        print(f"{prog or 'toy_lora_run'}: error: {exc}", file=sys.stderr)
        return 2
    print(format_result(result))
    return 0

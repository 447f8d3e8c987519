"""GradienceCallback on real transformers Trainer runs (tiny model, CPU).

Values in the run log are checked against independent sources: the Trainer's own ``log_history``, the
TrainingArguments / PEFT config the run was built from, and a direct torch evaluation of the final model.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from gradience.integrations.hf import (  # noqa: E402
    GradienceCallback,
    GradienceCallbackConfig,
    GradienceTelemetryWarning,
    _plain,
)
from gradience.toy.dataset import load_builtin  # noqa: E402
from gradience.toy.model import build_tiny_classifier, build_word_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_parts() -> dict[str, Any]:
    """Tokenizer and tokenized train/test rows of the shipped data (a plain function: the crash script
    below imports it)."""
    data = load_builtin()
    tokenizer = build_word_tokenizer(data.train_texts)

    def encode(texts: list[str], labels: list[int]) -> list[dict[str, Any]]:
        enc = tokenizer(texts, truncation=True, max_length=32)
        return [{"input_ids": i, "attention_mask": m, "labels": y}
                for i, m, y in zip(enc["input_ids"], enc["attention_mask"], labels, strict=True)]

    return {"tokenizer": tokenizer, "train": encode(data.train_texts[:160], data.train_labels[:160]),
            "test": encode(data.test_texts[:48], data.test_labels[:48])}


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    return build_parts()


def accuracy(eval_pred: Any) -> dict[str, float]:
    import numpy as np

    return {"accuracy": float((np.argmax(eval_pred.predictions, -1) == eval_pred.label_ids).mean())}


def make_trainer(parts: dict[str, Any], out: Path, callbacks: list[Any], *, peft: bool = True,
                 max_steps: int = 6, eval_dataset: Any = None, train_dataset: Any = None,
                 **arg_overrides: Any) -> Trainer:
    model = build_tiny_classifier(len(parts["tokenizer"]), 2, seed=0)
    if peft:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8,
                                                     lora_dropout=0.05, target_modules=["q_lin", "v_lin"]))
    kwargs: dict[str, Any] = dict(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8,
                                  learning_rate=3e-3, weight_decay=0.01, adam_beta2=0.98, adam_epsilon=1e-7,
                                  gradient_accumulation_steps=1, logging_steps=2, eval_strategy="steps",
                                  eval_steps=3, save_strategy="no", report_to="none", use_cpu=True,
                                  disable_tqdm=True, seed=7)
    kwargs.update(arg_overrides)
    return Trainer(model=model, args=TrainingArguments(**kwargs),
                   train_dataset=train_dataset if train_dataset is not None else parts["train"],
                   eval_dataset=eval_dataset if eval_dataset is not None else parts["test"],
                   data_collator=DataCollatorWithPadding(parts["tokenizer"]), compute_metrics=accuracy,
                   callbacks=callbacks)


def test_full_run_log_matches_trainer_history_and_config(parts: dict[str, Any], tmp_path: Path) -> None:
    cb = GradienceCallback(GradienceCallbackConfig(dataset_name="toy-data", model_name="tiny",
                                                   task_profile="easy_classification", notes="unit test",
                                                   train_eval_samples=16))
    trainer = make_trainer(parts, tmp_path, [cb])  # no attach(): the callback finds its Trainer
    trainer.train()
    records = read_jsonl(tmp_path / "run.jsonl")  # default: TrainingArguments.output_dir
    assert cb.path == tmp_path / "run.jsonl"
    assert {r["run_id"] for r in records} == {cb.run_id}
    events = [r["event"] for r in records]
    assert events[0] == "run_start" and events[-1] == "run_end" and records[-1]["status"] == "ok"
    assert events.count("run_start") == 1 and events.count("run_end") == 1

    config = records[0]["config"]
    args = trainer.args
    assert config["model_name"] == "tiny" and config["dataset_name"] == "toy-data"
    assert config["task_profile"] == "easy_classification" and config["notes"] == "unit test"
    assert config["optimizer"]["name"] == args.to_dict()["optim"]
    assert isinstance(config["optimizer"]["name"], str) and "OptimizerNames" not in config["optimizer"]["name"]
    assert config["optimizer"]["lr"] == pytest.approx(3e-3)
    assert config["optimizer"]["weight_decay"] == pytest.approx(0.01)
    assert config["optimizer"]["betas"] == pytest.approx([0.9, 0.98])
    assert config["optimizer"]["eps"] == pytest.approx(1e-7)
    assert config["lora"]["r"] == 4 and config["lora"]["alpha"] == 8
    assert config["lora"]["dropout"] == pytest.approx(0.05)
    assert sorted(config["lora"]["target_modules"]) == ["q_lin", "v_lin"]
    training = config["training"]
    assert (training["seed"], training["batch_size"], training["gradient_accumulation"],
            training["max_steps"]) == (7, 8, 1, 6)
    # Configured values, normalized as `gradience check` reads training_args.json (so both agree, issue 9):
    # num_train_epochs as given (max_steps wins over it), no mixed precision -> no dtype. The Trainer's plan
    # (6 steps of 8 rows over 160 rows is 0.3 epochs -> it schedules 1 epoch) and the weights dtype are extras.
    assert training["epochs"] == args.num_train_epochs and training["dtype"] is None
    assert training["extras"]["planned_epochs"] == trainer.state.num_train_epochs == 1
    assert training["extras"]["model_dtype"] == "float32"
    meta = records[0]["meta"]
    assert meta["world_size"] == 1 and meta["effective_batch_size"] == 8

    # train_step records are exactly the Trainer's own training logs.
    history = trainer.state.log_history
    logged = [h for h in history if "loss" in h]
    steps = [r for r in records if r["event"] == "train_step"]
    assert [r["step"] for r in steps] == [h["step"] for h in logged] == [2, 4, 6]
    for rec, h in zip(steps, logged, strict=True):
        assert rec["loss"] == pytest.approx(h["loss"])
        assert rec["lr"] == pytest.approx(h["learning_rate"])
        assert rec["grad_norm"] == pytest.approx(h["grad_norm"])
        assert rec["epoch"] == pytest.approx(h["epoch"])

    # test evals: prefix stripped, ppl = exp(loss), n = len(eval set), values = the Trainer's.
    evals = [r for r in records if r["event"] == "eval"]
    tests = [r for r in evals if r["split"] == "test"]
    hist_evals = [h for h in history if "eval_loss" in h]
    assert [r["step"] for r in tests] == [h["step"] for h in hist_evals] == [3, 6]
    for rec, h in zip(tests, hist_evals, strict=True):
        m = rec["metrics"]
        assert m["loss"] == pytest.approx(h["eval_loss"])
        assert m["accuracy"] == pytest.approx(h["eval_accuracy"])
        assert m["ppl"] == pytest.approx(math.exp(h["eval_loss"]))
        assert m["n"] == 48
    # train evals at the same steps, and the Trainer's history is not polluted by them.
    trains = [r for r in evals if r["split"] == "train"]
    assert [r["step"] for r in trains] == [3, 6]
    assert all(r["metrics"]["n"] == 16 and "accuracy" in r["metrics"] for r in trains)
    assert not any(k.startswith("train_eval") for h in history for k in h)

    # The final train eval is the mean cross-entropy of the final model on 16 evenly spaced train rows.
    model = trainer.model.eval()
    batch = DataCollatorWithPadding(parts["tokenizer"])(parts["train"][::10])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"]).item()
    acc = (logits.argmax(-1) == batch["labels"]).float().mean().item()
    assert trains[-1]["metrics"]["loss"] == pytest.approx(loss, rel=1e-4)
    assert trains[-1]["metrics"]["accuracy"] == pytest.approx(acc)

    audit = [r for r in records if r["event"] == "metrics" and r["kind"] == "lora_audit"]
    assert len(audit) == 1 and audit[0]["metrics"]["n_layers"] == 4  # 2 blocks x q_lin, v_lin
    assert audit[0]["step"] == 6


def test_explicit_train_eval_dataset_and_named_eval_sets(parts: dict[str, Any], tmp_path: Path) -> None:
    cb = GradienceCallback(GradienceCallbackConfig(output_dir=str(tmp_path / "telemetry"), filename="x.jsonl",
                                                   train_eval_dataset=parts["train"][:10],
                                                   audit_on_train_end=False))
    trainer = make_trainer(parts, tmp_path / "trainer", [cb], max_steps=3,
                           eval_dataset={"val": parts["test"][:8], "ood": parts["test"][8:20]})
    cb.attach(trainer)
    trainer.train()
    records = read_jsonl(tmp_path / "telemetry" / "x.jsonl")
    evals = [(r["step"], r["split"], r["metrics"].get("n")) for r in records if r["event"] == "eval"]
    assert evals == [(3, "val", 8), (3, "train", 10), (3, "ood", 12), (3, "train", 10)]
    assert not any(r["event"] == "metrics" and r["kind"] == "lora_audit" for r in records)
    assert not (tmp_path / "trainer" / "run.jsonl").exists()


def test_hf_datasets_train_subset(parts: dict[str, Any], tmp_path: Path) -> None:
    """A datasets.Dataset with an extra text column (the Trainer drops it) as the train-eval source."""
    import datasets

    rows = [dict(r, text=f"row {i}") for i, r in enumerate(parts["train"])]
    train = datasets.Dataset.from_list(rows)
    cb = GradienceCallback(GradienceCallbackConfig(train_eval_samples=8, audit_on_train_end=False))
    make_trainer(parts, tmp_path, [cb], max_steps=3, train_dataset=train).train()
    trains = [r for r in read_jsonl(tmp_path / "run.jsonl") if r["event"] == "eval" and r["split"] == "train"]
    assert [(r["step"], r["metrics"]["n"]) for r in trains] == [(3, 8)]


def test_full_finetune_without_peft_has_no_audit(parts: dict[str, Any], tmp_path: Path) -> None:
    cb = GradienceCallback()
    make_trainer(parts, tmp_path, [cb], peft=False, max_steps=2, eval_strategy="no").train()
    records = read_jsonl(tmp_path / "run.jsonl")
    assert [r["event"] for r in records] == ["run_start", "train_step", "metrics", "run_end"]
    assert records[2]["kind"] == "train_summary"
    assert records[0]["config"]["lora"]["r"] is None


def test_long_strings_are_redacted_unless_text_is_allowed(parts: dict[str, Any], tmp_path: Path) -> None:
    notes = "n" * 300
    for allow, expected in ((False, "[REDACTED len=300]"), (True, notes)):
        cb = GradienceCallback(GradienceCallbackConfig(notes=notes, telemetry_allow_text=allow,
                                                       audit_on_train_end=False))
        make_trainer(parts, tmp_path / str(allow), [cb], max_steps=1, eval_strategy="no").train()
        assert read_jsonl(tmp_path / str(allow) / "run.jsonl")[0]["config"]["notes"] == expected
    cb = GradienceCallback(GradienceCallbackConfig(notes="abcdefghij", telemetry_max_str_len=5,
                                                   audit_on_train_end=False))
    make_trainer(parts, tmp_path / "short", [cb], max_steps=1, eval_strategy="no").train()
    assert read_jsonl(tmp_path / "short" / "run.jsonl")[0]["config"]["notes"] == "[REDACTED len=10]"


def test_transformers_native_adapter_is_audited(parts: dict[str, Any], tmp_path: Path) -> None:
    """model.add_adapter (transformers' PEFT integration, no PeftModel wrapper) is audited too."""
    cb = GradienceCallback()
    trainer = make_trainer(parts, tmp_path, [cb], peft=False, max_steps=2, eval_strategy="no")
    trainer.model.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["q_lin", "v_lin"]))
    trainer.train()
    records = read_jsonl(tmp_path / "run.jsonl")
    audit = [r for r in records if r["event"] == "metrics" and r["kind"] == "lora_audit"]
    assert len(audit) == 1 and audit[0]["metrics"]["n_layers"] == 4
    assert records[0]["config"]["lora"]["r"] == 2


def test_unwritable_output_dir_warns_once_and_training_continues(parts: dict[str, Any], tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cb = GradienceCallback(GradienceCallbackConfig(output_dir=str(blocker / "sub"), train_eval_samples=8))
    trainer = make_trainer(parts, tmp_path / "t", [cb])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    ours = [w for w in caught if issubclass(w.category, GradienceTelemetryWarning)]
    assert len(ours) == 1
    assert "cannot open" in str(ours[0].message) and "training continues" in str(ours[0].message)
    assert trainer.state.global_step == 6


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_failing_writes_warn_once_and_training_continues(parts: dict[str, Any], tmp_path: Path) -> None:
    """/dev/full accepts the open and fails every write with ENOSPC: a real disk-full."""
    cb = GradienceCallback(GradienceCallbackConfig(output_dir="/dev", filename="full"))
    trainer = make_trainer(parts, tmp_path, [cb])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    ours = [w for w in caught if issubclass(w.category, GradienceTelemetryWarning)]
    assert len(ours) == 1 and "No space left" in str(ours[0].message)
    assert trainer.state.global_step == 6


class _FailAtStep(TrainerCallback):
    """A real exception from inside the training loop (as a crashing data/model step would raise)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            raise RuntimeError(f"boom at step {self.step}")


def test_guard_records_error_when_train_raises(parts: dict[str, Any], tmp_path: Path) -> None:
    cb = GradienceCallback()
    trainer = make_trainer(parts, tmp_path, [cb, _FailAtStep(4)])
    with pytest.raises(RuntimeError, match="boom at step 4"), cb.guard():
        trainer.train()
    records = read_jsonl(tmp_path / "run.jsonl")
    assert records[-1]["event"] == "run_end"
    assert records[-1]["status"] == "error"
    assert records[-1]["reason"] == "RuntimeError: boom at step 4"
    assert [r["event"] for r in records].count("run_end") == 1
    cb.end_run("ok")  # already closed: a no-op
    assert len(read_jsonl(tmp_path / "run.jsonl")) == len(records)


def test_second_train_call_starts_a_new_run(parts: dict[str, Any], tmp_path: Path) -> None:
    cb = GradienceCallback(GradienceCallbackConfig(audit_on_train_end=False))
    trainer = make_trainer(parts, tmp_path, [cb], max_steps=2, eval_strategy="no")
    trainer.train()
    first = cb.run_id
    trainer.train()
    records = read_jsonl(tmp_path / "run.jsonl")
    starts = [r["run_id"] for r in records if r["event"] == "run_start"]
    ends = [(r["run_id"], r["status"]) for r in records if r["event"] == "run_end"]
    assert starts == [first, cb.run_id] and first != cb.run_id
    assert ends == [(first, "ok"), (cb.run_id, "ok")]


_CRASH_SCRIPT = r"""
import sys, warnings
sys.path.insert(0, {tests!r})
warnings.simplefilter("ignore")
from test_integration_callback import make_trainer, _FailAtStep, build_parts
from gradience.integrations.hf import GradienceCallback
parts = build_parts()
cb = GradienceCallback()
make_trainer(parts, {out!r}, [cb, _FailAtStep(3)]).train()   # no guard: the process dies here
"""


@pytest.mark.slow
def test_uncaught_exception_without_guard_still_closes_the_run(tmp_path: Path) -> None:
    script = tmp_path / "crash.py"
    script.write_text(_CRASH_SCRIPT.format(tests=str(REPO / "tests"), out=str(tmp_path / "run")))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert "boom at step 3" in proc.stderr
    records = read_jsonl(tmp_path / "run" / "run.jsonl")
    assert records[0]["event"] == "run_start"
    assert records[-1]["event"] == "run_end"
    assert records[-1]["status"] == "error" and records[-1]["reason"] == "RuntimeError: boom at step 3"


def test_plain_converts_peft_config_values() -> None:
    from peft import TaskType as PeftTaskType

    class Weird:
        def __str__(self) -> str:
            return "weird"

    out = _plain({"t": PeftTaskType.SEQ_CLS, "s": {"b", "a"}, "tup": (1, 2.5), "o": Weird(), "n": None})
    assert out == {"t": "SEQ_CLS", "s": ["a", "b"], "tup": [1, 2.5], "o": "weird", "n": None}
    assert type(_plain(torch.__version__)) is str


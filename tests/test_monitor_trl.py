"""TRL's trainer metrics in monitor's story (issue 22 item 1): the ``trl`` block of ``--json`` and its text
section. A TensorBoard file written by a real SummaryWriter with TRL's tag names, the equivalent run.jsonl and
a trainer_state.json give the same block; its numbers are checked against numpy on the raw values."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.cli.main import main
from gradience.monitor.trl import MAX_NAMES, TrlAnalyzer
from gradience.telemetry.logmap import TRL_TRAIN_METRICS
from support.logs_runs import BOOKKEEPING, f32, reference_jsonl, run_json, scripted_run


def _trl_names(trainer: str) -> list[str]:
    """The metric names the installed TRL trainer logs (read from its source: independent of logmap's table),
    else the ones logmap cites for that trainer's file."""
    spec = importlib.util.find_spec("trl")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "trainer" / f"{trainer}_trainer.py"
        if path.is_file():
            found = set(re.findall(r'_metrics\[[^\]]+\]\[f?"([^"]+)"\]', path.read_text()))
            return sorted(n.replace("{reward_func_name}", "my_reward") for n in found)
    return sorted(k for k, v in TRL_TRAIN_METRICS.items() if v == f"trl/trainer/{trainer}_trainer.py")


def _value(name: str, step: int) -> float:
    """A distinct, non-monotone series per name (so min/max/first/last differ)."""
    h = sum(map(ord, name)) % 7
    return 0.1 * (h + 1) * step + math.sin(step + h)


def _trl_run(names: list[str]) -> tuple[list[tuple[str, int, dict[str, Any]]], dict[int, dict[str, float]]]:
    """The scripted run's events with TRL values per train step, and the values alone (f32-rounded as
    TensorBoard stores them)."""
    events = scripted_run()
    trl: dict[int, dict[str, float]] = {}
    for event, step, _data in events:
        if event == "train_step":
            trl[step] = {n: f32(_value(n, step)) for n in names}
    return events, trl


def _write_tensorboard(root: Path, events: list[tuple[str, int, dict[str, Any]]],
                       trl: dict[int, dict[str, float]], eval_trl: dict[str, float]) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    names = {"loss": "loss", "lr": "learning_rate", "grad_norm": "grad_norm", "epoch": "epoch"}
    writer = SummaryWriter(str(root / "runs" / "trl"))
    for event, step, data in events:
        if event == "train_step":
            for key, value in data.items():
                writer.add_scalar(f"train/{names[key]}", value, step)
            for key, value in trl[step].items():  # TRL's log(): averaged _metrics in the Trainer's dict
                writer.add_scalar(f"train/{key}", value, step)
        else:
            for key, value in {**data["metrics"], **eval_trl}.items():
                writer.add_scalar(f"eval/{key}", value, step)
    writer.close()
    return root / "runs"


def _reference(path: Path, events: list[tuple[str, int, dict[str, Any]]], trl: dict[int, dict[str, float]],
               eval_trl: dict[str, float]) -> Path:
    ref = []
    for event, step, data in events:
        if event == "train_step":
            ref.append((event, step, {**data, **trl[step]}))
        else:
            ref.append((event, step, {"split": data["split"], "metrics": {**data["metrics"], **eval_trl}}))
    return reference_jsonl(path, ref, f32)


def _check_against_numpy(block: dict[str, Any], trl: dict[int, dict[str, float]]) -> None:
    """first/last/min/max and the trend slope of every name, from the raw values."""
    steps = sorted(trl)
    for name in trl[steps[0]]:
        m = block["metrics"][name]
        ys = np.array([trl[s][name] for s in steps])
        assert (m["n"], m["nonfinite"]) == (len(steps), 0)
        assert (m["first"], m["first_step"], m["last"], m["last_step"]) == (ys[0], steps[0], ys[-1], steps[-1])
        assert (m["min"], m["min_step"]) == (ys.min(), steps[int(ys.argmin())])
        assert (m["max"], m["max_step"]) == (ys.max(), steps[int(ys.argmax())])
        xs = np.array(steps[-20:], dtype=float)
        slope = np.polyfit(xs, ys[-20:], 1)[0]
        assert m["trend"]["slope_per_step"] == pytest.approx(slope, rel=1e-9, abs=1e-12)
        assert m["trend"]["change"] == pytest.approx(slope * (xs[-1] - xs[0]), rel=1e-9, abs=1e-12)
        assert m["trend"]["direction"] == ("increasing" if m["trend"]["relative_change"] > 0.02 else
                                           "decreasing" if m["trend"]["relative_change"] < -0.02 else "flat")


def test_dpo_tensorboard_equals_run_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tensorboard")
    names = _trl_names("dpo")
    assert {"rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"} <= set(names)
    events, trl = _trl_run(names)
    eval_trl = {"rewards/margins": f32(0.3), "rewards/accuracies": f32(0.75)}
    ours = run_json(capsys, _write_tensorboard(tmp_path, events, trl, eval_trl))
    ref = run_json(capsys, _reference(tmp_path / "run.jsonl", events, trl, eval_trl))
    assert {k: v for k, v in ours.items() if k not in BOOKKEEPING} == \
        {k: v for k, v in ref.items() if k not in BOOKKEEPING}
    block = ours["trl"]
    assert block["train"]["records"] == len(trl) and block["train"]["names_not_listed"] == 0
    _check_against_numpy(block["train"], trl)
    assert "preference" in block["groups"] and "dpo_trainer.py" in block["groups"]["preference"]["source"]
    assert set(block["train"]["groups"]["preference"]) >= {"rewards/margins", "rewards/accuracies"}
    ev = block["eval"]["eval"]
    assert ev["records"] == 3 and ev["first_step"] == 10 and ev["last_step"] == 30
    assert ev["metrics"]["rewards/accuracies"]["last"] == f32(0.75)
    # reward accuracy is not the eval accuracy the underfit rule reads: that stays the logged `accuracy`
    assert ours["signals"]["test_accuracy"] == 0.5
    # the TRL tags are still listed (known, not unknown)
    codes = {i["code"]: i for i in ours["telemetry_issues"]}
    assert "unknown_tag" not in codes and "trl block" in codes["known_tag"]["message"]


def test_grpo_trainer_state_and_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """GRPO names in a trainer_state.json log_history (bare keys, as the Trainer keeps them) give the block the
    run.jsonl gives; the text shows the section with the headline metrics first."""
    names = _trl_names("grpo")
    assert {"reward", "reward_std", "kl", "completions/mean_length"} <= set(names)
    events, trl = _trl_run(names)
    history: list[dict[str, Any]] = []
    for event, step, data in events:
        if event == "train_step":
            history.append({"step": step, "loss": data["loss"], "learning_rate": data["lr"],
                            "grad_norm": data["grad_norm"], "epoch": data["epoch"], **trl[step]})
        else:
            history.append({"step": step, **{f"eval_{k}": v for k, v in data["metrics"].items()}})
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"log_history": history, "global_step": 30}))
    ours = run_json(capsys, state)
    ref = run_json(capsys, _reference(tmp_path / "run.jsonl", events, trl, {}))
    assert ours["trl"] == ref["trl"]
    assert ours["trl"]["eval"] == {} and set(ours["trl"]["groups"]) >= {"online_rl", "shared"}
    _check_against_numpy(ours["trl"]["train"], trl)

    assert main(["monitor", str(state)]) == 0
    text = capsys.readouterr().out
    section = text[text.index("TRL metrics"):text.index("Diagnostics:")]
    lines = section.splitlines()
    assert lines[1].startswith("  train (steps 1-30; GRPO/RLOO")
    assert lines[2].split()[0] == "reward" and lines[3].split()[0] == "reward_std" and lines[4].split()[0] == "kl"
    r = ours["trl"]["train"]["metrics"]["reward"]
    assert f"last {r['last']:.4g} @ 30" in lines[2] and f"max {r['max']:.4g} @ {r['max_step']}" in lines[2]
    hidden = len(names) - 12
    assert f"… {hidden} more TRL metric(s) (see --json)" in section


def test_run_without_trl_shows_nothing_new(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A plain run (an eval `accuracy`, extra non-TRL train fields): `trl` is null, no text section."""
    events = [(e, s, {**d, "tokens": 100.0 * s, "my_metric": 1.0} if e == "train_step" else d)
              for e, s, d in scripted_run()]
    path = tmp_path / "run.jsonl"
    reference_jsonl(path, events)
    data = run_json(capsys, path)
    assert "trl" in data and data["trl"] is None
    assert main(["monitor", str(path)]) == 0
    assert "TRL" not in capsys.readouterr().out


def test_bounds_and_nonfinite() -> None:
    """Names beyond MAX_NAMES are counted, not kept; NaN values are counted and stay out of min/max/trend."""
    trl = TrlAnalyzer()
    for step in range(1, 6):
        row = {"kl": math.nan if step == 2 else 0.5 * step}
        row.update({f"rewards/f{i}/mean": float(i) for i in range(MAX_NAMES + 5)})
        trl.feed_train(step, row)
    block = trl.summary()
    assert block is not None
    train = block["train"]
    assert len(train["metrics"]) == MAX_NAMES and train["names_not_listed"] == 6
    kl = train["metrics"]["kl"]
    assert (kl["n"], kl["nonfinite"], kl["min"], kl["max"], kl["first"]) == (5, 1, 0.5, 2.5, 0.5)
    assert kl["trend"]["window"] == 4 and kl["trend"]["slope_per_step"] == pytest.approx(0.5)


def test_llamafactory_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """LLaMA-Factory's LogCallback copies TRL's ``reward`` and DPO's ``rewards/accuracies`` (as ``accuracy``)
    into trainer_log.jsonl: both reach the block, and the source says what ``accuracy`` is there."""
    rows = [{"current_steps": s, "total_steps": 4, "loss": 1.0 / s, "lr": 1e-4, "reward": [0.3, -0.1, 0.5, 0.2][s - 1],
             "accuracy": 0.5 + 0.1 * s, "epoch": s / 4} for s in (1, 2, 3, 4)]
    path = tmp_path / "trainer_log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    block = run_json(capsys, path)["trl"]
    reward, acc = block["train"]["metrics"]["reward"], block["train"]["metrics"]["accuracy"]
    assert (reward["min"], reward["min_step"], reward["max"], reward["max_step"]) == (-0.1, 2, 0.5, 3)
    assert (acc["first"], acc["last"], acc["trend"]["direction"]) == (0.6, 0.9, "increasing")
    assert "rewards/accuracies" in block["groups"]["reward_model"]["source"]


def _tiny_dpo_trainer(out: Path, callbacks: list[Any] | None = None) -> Any:
    """A real TRL DPOTrainer on a one-layer Llama with a word-level tokenizer (nothing from the Hub)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    words = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "log", "yes", "no", "good", "bad"]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    base = out / "base"
    LlamaForCausalLM(cfg).save_pretrained(base)  # DPOTrainer builds its reference model from the model's path
    tok.save_pretrained(base)
    rows = [{"prompt": "the cat sat on", "chosen": " the mat", "rejected": " a log"},
            {"prompt": "the dog ran", "chosen": " yes good", "rejected": " no bad"}] * 4
    data = Dataset.from_list(rows)
    args = DPOConfig(output_dir=str(out / "run"), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                     max_steps=6, logging_steps=1, eval_strategy="steps", eval_steps=3, learning_rate=1e-3,
                     report_to=["tensorboard"], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    return DPOTrainer(model=LlamaForCausalLM.from_pretrained(base), args=args, train_dataset=data,
                      eval_dataset=data, processing_class=tok, callbacks=callbacks)


@pytest.mark.slow
def test_real_dpo_trainer_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A DPOTrainer run's TensorBoard log and its trainer_state.json give the block of its log_history."""
    pytest.importorskip("tensorboard")
    from gradience.integrations.hf import GradienceCallback, GradienceCallbackConfig

    trainer = _tiny_dpo_trainer(tmp_path, [GradienceCallback(GradienceCallbackConfig(audit_on_train_end=False))])
    trainer.train()
    capsys.readouterr()  # the Trainer prints its log dicts
    state = tmp_path / "run" / "trainer_state.json"
    trainer.state.save_to_json(str(state))
    history = trainer.state.log_history
    train_rows = [h for h in history if "loss" in h and "train_runtime" not in h]
    eval_rows = [h for h in history if "eval_loss" in h]
    assert train_rows and eval_rows and "rewards/margins" in train_rows[0]
    tb = run_json(capsys, tmp_path / "run" / "runs")
    js = run_json(capsys, state)
    for block, rounding in ((tb["trl"], f32), (js["trl"], float)):
        train = block["train"]
        names = {k for k in train_rows[0] if k not in ("loss", "grad_norm", "learning_rate", "epoch", "step")}
        assert set(train["metrics"]) == names and train["records"] == len(train_rows)
        for name in ("rewards/margins", "rewards/accuracies", "logps/chosen", "mean_token_accuracy"):
            ys = [rounding(h[name]) for h in train_rows]
            steps = [h["step"] for h in train_rows]
            m = train["metrics"][name]
            assert (m["first"], m["last"], m["min"], m["max"]) == (ys[0], ys[-1], min(ys), max(ys))
            assert m["max_step"] == steps[ys.index(max(ys))]
        ev = block["eval"]["eval"]["metrics"]["rewards/accuracies"]
        assert ev["n"] == len(eval_rows) and ev["last"] == rounding(eval_rows[-1]["eval_rewards/accuracies"])
        assert "preference" in block["groups"]
    # Gradience's own callback on the same run records the same train-side TRL values (no float32 rounding)
    cb = run_json(capsys, tmp_path / "run" / "run.jsonl")["trl"]["train"]
    assert cb["metrics"] == js["trl"]["train"]["metrics"] and cb["records"] == len(train_rows)
    # DPO's reward accuracy is not the run's accuracy (no eval `accuracy` was logged)
    assert tb["signals"]["test_accuracy"] is None and js["signals"]["test_accuracy"] is None
    assert main(["monitor", str(tmp_path / "run" / "runs")]) == 0
    assert "    rewards/margins " in capsys.readouterr().out


def test_hostile_values_and_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Values that are not numbers that fit a float are skipped (no traceback); a name with control characters
    is escaped in text."""
    lines = [{"schema": "gradience.telemetry/v1", "run_id": "r", "event": "train_step", "step": s, "loss": 1.0,
              "reward": [1.5, True, "NaN-ish", None][s - 1], "rewards/margins": 10 ** 400 if s == 2 else s,
              "rewards/x\x1b[31m/mean": 0.5} for s in (1, 2, 3, 4)]
    path = tmp_path / "run.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    data = run_json(capsys, path)
    metrics = data["trl"]["train"]["metrics"]
    assert metrics["reward"]["n"] == 1 and metrics["reward"]["last"] == 1.5
    assert metrics["rewards/margins"]["n"] == 3 and metrics["rewards/margins"]["max"] == 4.0
    assert main(["monitor", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "rewards/x" in out

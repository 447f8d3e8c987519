"""TRL's metric names on other tools' logs (issue 22): known (listed, not used) rather than unknown, and the
eval ones (``eval/rewards/margins`` ...) reach the eval split like any eval metric."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

from gradience.telemetry.logmap import classify
from support.logs_runs import BOOKKEEPING, f32, reference_jsonl, run_json, scripted_run

TRAINERS = ("sft", "dpo", "kto", "grpo", "rloo", "reward")


def _installed_trl_metric_names() -> dict[str, set[str]]:
    """The names each installed TRL trainer appends to ``self._metrics[mode][...]`` (read from its source
    files, not imported: an independent list from the one in logmap)."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("trl is not installed")
    root = Path(next(iter(spec.submodule_search_locations))) / "trainer"
    out: dict[str, set[str]] = {}
    for name in TRAINERS:
        path = root / f"{name}_trainer.py"
        if path.is_file():
            out[name] = set(re.findall(r'_metrics\[[^\]]+\]\[f?"([^"]+)"\]', path.read_text()))
    assert out.get("dpo") and out.get("sft"), "TRL's trainers moved: update this test and logmap's TRL names"
    return out


def test_every_installed_trl_metric_is_known() -> None:
    for trainer, names in _installed_trl_metric_names().items():
        for raw in names:
            name = raw.replace("{reward_func_name}", "my_reward")
            assert classify(f"train/{name}")[0] in ("known", "train"), (trainer, name)
            kind, _split, metric = classify(f"eval/{name}")  # TRL logs eval ones as eval_<name>
            assert (kind, metric) == ("eval", name), (trainer, name)
    # the Trainer's own names still map as before; a name nothing knows is still unknown
    assert classify("train/loss") == ("train", None, "loss")
    assert classify("train/rewards_chosen_typo")[0] == "unknown"


def _dpo_logs(step: int) -> dict[str, float]:
    """What DPOTrainer.log adds to the Trainer's dict (averaged ``_metrics["train"]``)."""
    return {"rewards/chosen": 0.1 * step, "rewards/rejected": -0.1 * step, "rewards/accuracies": 0.5 + step / 100,
            "rewards/margins": 0.2 * step, "logps/chosen": -50.0, "logps/rejected": -60.0, "logits/chosen": -1.5,
            "logits/rejected": -1.7, "num_tokens": 1000.0 * step, "mean_token_accuracy": 0.4, "entropy": 2.0}


def test_dpo_tensorboard_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A DPO run as TensorBoardCallback writes it: the train metrics are listed as known TRL metrics, the
    eval ones are eval metrics; the rest of the report equals the run.jsonl of the Trainer's values."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    events = scripted_run()
    names = {"loss": "loss", "lr": "learning_rate", "grad_norm": "grad_norm", "epoch": "epoch"}
    ref_events: list[tuple[str, int, dict[str, Any]]] = []
    writer = SummaryWriter(str(tmp_path / "runs" / "dpo"))
    for event, step, data in events:
        if event == "train_step":
            for key, value in data.items():
                writer.add_scalar(f"train/{names[key]}", value, step)
            for key, value in _dpo_logs(step).items():
                writer.add_scalar(f"train/{key}", value, step)
            ref_events.append((event, step, {**data, **_dpo_logs(step)}))  # run.jsonl carries TRL's fields too
        else:
            metrics = dict(data["metrics"])
            metrics.update({"rewards/margins": 0.3, "rewards/accuracies": 0.75})
            for key, value in metrics.items():
                writer.add_scalar(f"eval/{key}", value, step)
            ref_events.append((event, step, {"split": data["split"], "metrics": metrics}))
    writer.close()
    ours = run_json(capsys, tmp_path / "runs")
    ref = run_json(capsys, reference_jsonl(tmp_path / "run.jsonl", ref_events, f32))
    assert {k: v for k, v in ours.items() if k not in BOOKKEEPING} == \
        {k: v for k, v in ref.items() if k not in BOOKKEEPING}
    issues = {i["code"]: i for i in ours["telemetry_issues"]}
    assert "unknown_tag" not in issues
    n_train = sum(1 for e in events if e[0] == "train_step")
    assert issues["known_tag"]["tags"] == {f"train/{k}": n_train for k in _dpo_logs(1)}
    assert issues["known_tag"]["severity"] == "info" and "TRL" in issues["known_tag"]["message"]


def test_llamafactory_dpo_keys_are_known(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """LLaMA-Factory's LogCallback copies DPO's ``rewards/accuracies`` as ``accuracy`` and GRPO's ``reward``."""
    path = tmp_path / "trainer_log.jsonl"
    rows = [{"current_steps": s, "total_steps": 3, "loss": 1.0 / s, "lr": 1e-4, "reward": 0.1 * s,
             "accuracy": 0.6, "epoch": s / 3, "percentage": s * 33.3} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ours = run_json(capsys, path)
    issues = {i["code"]: i for i in ours["telemetry_issues"]}
    assert "unknown_tag" not in issues and issues["known_tag"]["tags"] == {"accuracy": 3, "reward": 3}
    assert ours["training"]["steps_logged"] == 3

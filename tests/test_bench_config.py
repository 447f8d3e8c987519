"""Bench config: the reference tool's YAML as is, strict keys with the closest known key, checked values."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from gradience.bench.config import load_bench_config, parse_arms
from gradience.cli.main import main
from gradience.errors import InputError

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "bench_config_reference_tool.yaml"
REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bench.yaml"
    p.write_text(text)
    return p


@pytest.fixture
def reference_yaml(tmp_path: Path) -> Path:
    if REFERENCE.is_file():
        return Path(shutil.copy(REFERENCE, tmp_path / "reference.yaml"))
    # The same schema, inline (the shared/ folder is beside the checkout in CI, but be robust).
    return _write(tmp_path, """bench_version: "0.1"
model: {name: "distilbert-base-uncased"}
task: {dataset: "glue", subset: "sst2", metric: "accuracy"}
train: {seed: 42, max_steps: 200, eval_steps: 50, lr: 0.00005, weight_decay: 0.0,
        per_device_train_batch_size: 8, per_device_eval_batch_size: 32}
lora: {probe_r: 16, alpha: 16, dropout: 0.0, target_modules: ["q_lin","k_lin","v_lin","out_lin"]}
compression: {allowed_ranks: [1,2,4,8,16,32], acc_tolerance: 0.005}
audit: {base_model: "distilbert-base-uncased", compute_udr: true}
runtime: {device: "cpu", smoke_max_steps: 50, smoke_train_samples: 200, smoke_eval_samples: 200}
""")


def test_reference_tool_config_is_accepted_as_is(reference_yaml: Path) -> None:
    cfg = load_bench_config(reference_yaml)
    assert cfg.model == "distilbert-base-uncased"
    assert cfg.dataset_spec == "glue/sst2" and cfg.metric == "accuracy" and cfg.task_type == "classification"
    assert (cfg.train_seed, cfg.max_steps, cfg.eval_steps, cfg.lr) == (42, 200, 50, 5e-5)
    assert (cfg.train_batch_size, cfg.eval_batch_size) == (8, 32)
    assert (cfg.probe_r, cfg.alpha, cfg.dropout) == (16, 16.0, 0.0)
    assert cfg.target_modules == ("q_lin", "k_lin", "v_lin", "out_lin")
    assert cfg.allowed_ranks == (1, 2, 4, 8, 16, 32) and cfg.tolerance == 0.005
    assert cfg.base_model == "distilbert-base-uncased" and cfg.compute_udr is True
    smoke = load_bench_config(reference_yaml).effective()
    assert smoke.max_steps == 200  # not smoke: unchanged
    from dataclasses import replace

    smoke = replace(cfg, smoke=True).effective()
    assert (smoke.max_steps, smoke.max_train_samples, smoke.max_eval_samples) == (50, 200, 200)
    assert cfg.seed_list() == (42,)


@pytest.mark.parametrize(("text", "expected"), [
    ("trian: {seed: 1}\n", "did you mean 'train'"),
    ("lora: {probe_rank: 8}\n", "did you mean 'probe_r'"),
    ("compression: {acc_tolerence: 0.01}\n", "did you mean 'acc_tolerance'"),
    ("runtime: {smoke_steps: 5}\n", "did you mean 'smoke_max_steps'"),
])
def test_unknown_keys_name_the_closest_known_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(InputError, match=expected):
        load_bench_config(_write(tmp_path, text))


@pytest.mark.parametrize(("text", "expected"), [
    ("train: {lr: fast}\n", "train.lr: expected a number"),
    ("train: {max_steps: -3}\n", "train.max_steps: must be between"),
    ("train: {max_steps: 2.5}\n", "train.max_steps: expected an integer"),
    ("lora: {probe_r: true}\n", "lora.probe_r: expected an integer"),
    ("audit: {compute_udr: 'yes'}\n", "audit.compute_udr: expected true or false"),
    ("compression: {allowed_ranks: [4, x]}\n", "compression.allowed_ranks: expected integers"),
    ("task: {type: seq2seq}\n", "task.type: unknown task type"),
    ("task: {metric: f1}\n", "not a metric of a classification task"),
    ("seeds: [1, -2]\n", "between 0 and"),
    ("arms: [truncate_medain]\n", "did you mean 'truncate_median'"),
    ("arms: ['uniform:0']\n", "uniform:K needs a rank"),
    ("model: [1, 2]\n", "expected a mapping"),
    ("- just\n- a list\n", "must be a mapping"),
    ("train: {lr: [\n", "invalid YAML"),
])
def test_bad_values_are_one_clear_error(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(InputError, match=expected) as info:
        load_bench_config(_write(tmp_path, text))
    assert str(tmp_path) in str(info.value)


def test_yaml11_exponent_strings_are_numbers(tmp_path: Path) -> None:
    cfg = load_bench_config(_write(tmp_path, "train: {lr: 5e-5}\n"))  # YAML 1.1 reads this as a string
    assert cfg.lr == 5e-5


def test_arms_parse_and_deduplicate() -> None:
    assert parse_arms("truncate_median, uniform:8 uniform:8") == ("truncate_median", "uniform:8")


def test_shipped_configs_load() -> None:
    toy = load_bench_config(REPO / "examples" / "bench" / "toy.yaml")
    assert toy.model == "gradience/tiny-distilbert" and toy.compute_udr
    causal = load_bench_config(REPO / "examples" / "bench" / "toy_causal.yaml")
    assert causal.task_type == "causal_lm" and causal.metric == "eval_loss" and not causal.higher_is_better


def test_cli_bad_config_is_exit_2_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "--config", str(_write(tmp_path, "lorra: {}\n"))])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("gradience bench: error:") and "did you mean 'lora'" in err
    assert main(["bench", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_uncached_hub_model_fails_fast_and_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty cache
    cfg = _write(tmp_path, "model: {name: nobody-here/no-such-model}\ntrain: {max_steps: 2}\n")
    started = time.perf_counter()
    code = main(["bench", "--config", str(cfg), "--output-dir", str(tmp_path / "out")])
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 2, err
    assert "nobody-here/no-such-model" in err and "offline and not in the local Hugging Face cache" in err
    assert err.count("\n") == 1
    assert elapsed < 60  # no retry loops (generous: includes importing transformers on a busy machine)

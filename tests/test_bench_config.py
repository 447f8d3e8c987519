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
    error = [line for line in err.splitlines() if not line.startswith("bench: ")]  # progress lines aside
    assert len(error) == 1 and error[0].startswith("gradience bench: error:"), err
    assert "nobody-here/no-such-model" in error[0] and "local Hugging Face cache" in error[0]
    assert elapsed < 60  # no retry loops (generous: includes importing transformers on a busy machine)


# -- the reference tool's bench YAMLs (issue 17 item 4) ---------------------------------------------------------
# Extracted from johntnanney/gradience (gradience/bench/configs/*.yaml, examples/configs/*.yaml,
# experiments/mechanism_test_config.yaml, bench_runs/firstclass_multiseed_test/seed_*/config.yaml): which keys
# each of its 51 bench YAMLs sets. The test builds an equivalent config from the key set and one value per key.
KEY_SETS: list[tuple[str, str, str]] = [  # (reference YAMLs, task kind, the keys each of them sets)
    ('bench_runs/seed_123_config bench_runs/seed_42_config bench_runs/seed_456_config',
     'seqcls',
     'bench_version compression.acc_tolerance compression.allowed_ranks compression.variants_to_test '
     'lora.alpha lora.dropout lora.probe_r lora.target_modules model.name run_type runtime.device '
     'task.dataset task.metric task.subset train.eval_samples train.eval_steps train.lr train.max_steps '
     'train.per_device_eval_batch_size train.per_device_train_batch_size train.save_steps train.seed '
     'train.train_samples train.weight_decay'),
    ('examples/glue_sst2',
     'seqcls',
     'audit.enable_composition_analysis bench bench_version lora.alpha lora.dropout lora.probe_r '
     'lora.target_modules model.name model.type multi_seed output task.dataset task.eval_max_samples '
     'task.probe_gate task.profile task.subset train.batch_size train.eval_steps train.learning_rate '
     'train.logging_steps train.max_length train.num_epochs train.save_steps train.seed '
     'train.train_samples'),
    ('examples/smoke_gsm8k',
     'causal',
     'bench bench_version lora.alpha lora.dropout lora.probe_r lora.target_modules model.name model.type '
     'output task.dataset task.eval_max_samples task.probe_gate task.profile task.subset train.batch_size '
     'train.eval_steps train.learning_rate train.logging_steps train.max_length train.num_epochs '
     'train.save_steps train.seed train.train_samples'),
    ('experiments/mechanism_test_config',
     'causal',
     'compression.allowed_ranks compression.variants env hypothesis lora.alpha lora.dropout lora.probe_r '
     'lora.target_modules metadata model.name model.type task.dataset task.profile task.subset '
     'train.eval_samples train.eval_steps train.gradient_accumulation_steps train.learning_rate '
     'train.logging_steps train.max_steps train.per_device_train_batch_size train.save_steps train.seeds '
     'train.train_samples train.warmup_steps'),
    ('distilbert_qnli_certifiable_seed123 distilbert_qnli_certifiable_seed42 '
     'distilbert_qnli_certifiable_seed456 distilbert_sst2_certifiable_seed123 '
     'distilbert_sst2_certifiable_seed42 distilbert_sst2_certifiable_seed456 '
     'distilbert_sst2_low_quality_test distilbert_sst2_mini_validation distilbert_sst2_r32_seed123 '
     'distilbert_sst2_r32_seed42 distilbert_sst2_r32_seed456 distilbert_sst2_r32_validation '
     'distilbert_sst2_uniform_r16_extended_seed42 distilbert_sst2_uniform_r16_seed123 '
     'distilbert_sst2_uniform_r16_seed42 distilbert_sst2_uniform_r16_seed456 '
     'distilbert_sst2_uniform_r20_seed123 distilbert_sst2_uniform_r20_seed42 '
     'distilbert_sst2_uniform_r20_seed456 distilbert_sst2_uniform_r24_seed123 '
     'distilbert_sst2_uniform_r24_seed42 distilbert_sst2_uniform_r24_seed456 '
     'distilbert_sst2_uniform_r8_seed123 distilbert_sst2_uniform_r8_seed42 '
     'distilbert_sst2_uniform_r8_seed456 roberta_qnli_certifiable_seed123 roberta_qnli_certifiable_seed42 '
     'roberta_qnli_certifiable_seed456 roberta_sst2_certifiable_seed123 roberta_sst2_certifiable_seed42 '
     'roberta_sst2_certifiable_seed456',
     'seqcls',
     'bench_version compression.acc_tolerance compression.allowed_ranks lora.alpha lora.dropout '
     'lora.probe_r lora.target_modules model.name run_type runtime.device task.dataset task.metric '
     'task.subset train.eval_samples train.eval_steps train.lr train.max_steps '
     'train.per_device_eval_batch_size train.per_device_train_batch_size train.save_steps train.seed '
     'train.train_samples train.weight_decay'),
    ('distilbert_sst2',
     'seqcls',
     'bench_version compression.acc_tolerance compression.allowed_ranks lora.alpha lora.dropout '
     'lora.probe_r lora.target_modules model.name runtime.device runtime.smoke_eval_samples '
     'runtime.smoke_max_steps runtime.smoke_train_samples task.dataset task.metric task.subset '
     'train.eval_steps train.lr train.max_steps train.per_device_eval_batch_size '
     'train.per_device_train_batch_size train.seed train.weight_decay'),
    ('distilbert_sst2_ci',
     'seqcls',
     'bench_version compression.acc_tolerance compression.allowed_ranks lora.alpha lora.dropout '
     'lora.probe_r lora.target_modules model.name runtime.device runtime.keep_adapter_weights '
     'runtime.keep_checkpoints runtime.smoke_eval_samples runtime.smoke_max_steps '
     'runtime.smoke_train_samples task.dataset task.metric task.subset train.eval_steps train.lr '
     'train.max_steps train.per_device_eval_batch_size train.per_device_train_batch_size train.seed '
     'train.weight_decay'),
    ('distilbert_sst2_firstclass_multiseed distilbert_sst2_multiseed distilbert_sst2_uniform_r8_multiseed',
     'seqcls',
     'bench_version compression.acc_tolerance compression.allowed_ranks compression.seeds '
     'compression.variants_to_test lora.alpha lora.dropout lora.probe_r lora.target_modules model.name '
     'run_type runtime.device task.dataset task.metric task.subset train.eval_samples train.eval_steps '
     'train.lr train.max_steps train.per_device_eval_batch_size train.per_device_train_batch_size '
     'train.save_steps train.train_samples train.weight_decay'),
    ('distilbert_sst2_validation',
     'seqcls',
     'bench_version compression.acc_tolerance compression.allowed_ranks lora.alpha lora.dropout '
     'lora.probe_r lora.target_modules model.device model.name run_type runtime.device task.dataset '
     'task.metric task.subset train.eval_samples train.eval_steps train.lr train.max_steps '
     'train.per_device_eval_batch_size train.per_device_train_batch_size train.save_steps train.seed '
     'train.train_samples train.weight_decay'),
    ('distilbert_sst2_with_udr',
     'seqcls',
     'audit.base_model audit.compute_udr bench_version compression.acc_tolerance compression.allowed_ranks '
     'lora.alpha lora.dropout lora.probe_r lora.target_modules model.name runtime.device '
     'runtime.smoke_eval_samples runtime.smoke_max_steps runtime.smoke_train_samples task.dataset '
     'task.metric task.subset train.eval_steps train.lr train.max_steps train.per_device_eval_batch_size '
     'train.per_device_train_batch_size train.seed train.weight_decay'),
    ('gpu_smoke_mistral_gsm8k_gpu_smoke',
     'causal',
     'audit.compute_udr bench_version compression.acc_tolerance compression.allowed_ranks lora.alpha '
     'lora.dropout lora.probe_r lora.target_modules model.gradient_checkpointing model.name '
     'model.torch_dtype model.type model.use_cache run_type runtime.device runtime.keep_adapter_weights '
     'runtime.keep_checkpoints task.dataset task.eval_max_samples task.generation task.probe_gate '
     'task.profile task.subset train.eval_samples train.eval_steps train.gradient_accumulation_steps '
     'train.learning_rate train.logging_steps train.max_steps train.per_device_eval_batch_size '
     'train.per_device_train_batch_size train.report_to train.save_strategy train.seed train.train_samples '
     'train.warmup_ratio train.weight_decay'),
    ('mistral_gsm8k_certifiable_seed123 mistral_gsm8k_certifiable_seed42 mistral_gsm8k_certifiable_seed456 '
     'mistral_gsm8k_screening_seed42 mistral_gsm8k_screening_seed42_r64 '
     'mistral_gsm8k_screening_seed42_r64_steps1200',
     'causal',
     'compression.acc_tolerance compression.allowed_ranks lora.alpha lora.dropout lora.probe_r '
     'lora.target_modules model.gradient_checkpointing model.name model.torch_dtype model.type '
     'model.use_cache run_type runtime.device seed task.dataset task.eval_max_samples task.generation '
     'task.probe_gate task.profile task.subset train.eval_steps train.gradient_accumulation_steps '
     'train.learning_rate train.logging_steps train.max_steps train.per_device_eval_batch_size '
     'train.per_device_train_batch_size train.report_to train.save_strategy train.seed train.train_samples '
     'train.warmup_ratio train.weight_decay'),
]

# One value per key, of the type and range the reference's YAMLs use (seqcls first; causal overrides below).
REFERENCE_VALUES: dict[str, object] = {
    "bench_version": "0.1", "run_type": "certifiable_v0.1_seed42", "seed": 42,
    "model.name": "distilbert-base-uncased", "model.type": "seqcls", "model.torch_dtype": "bf16",
    "model.gradient_checkpointing": True, "model.use_cache": False, "model.device": "cpu",
    "task.dataset": "glue", "task.subset": "sst2", "task.metric": "accuracy", "task.profile": "seqcls_glue",
    "task.eval_max_samples": 500, "task.probe_gate": {"metric": "accuracy", "min_value": 0.8},
    "task.generation": {"max_new_tokens": 128, "do_sample": False, "temperature": 0.0, "num_beams": 1},
    "lora.probe_r": 16, "lora.alpha": 16, "lora.dropout": 0.1, "lora.target_modules": ["q_lin", "k_lin", "v_lin"],
    "train.seed": 42, "train.max_steps": 500, "train.eval_steps": 100, "train.lr": 5e-05, "train.learning_rate": "2e-4",
    "train.weight_decay": 0.01, "train.per_device_train_batch_size": 8, "train.per_device_eval_batch_size": 32,
    "train.gradient_accumulation_steps": 16, "train.logging_steps": 10, "train.warmup_ratio": 0.03,
    "train.train_samples": 2000, "train.eval_samples": 500, "train.save_steps": 200, "train.save_strategy": "no",
    "train.report_to": "none", "train.batch_size": 16, "train.num_epochs": 3, "train.max_length": 128,
    "train.warmup_steps": 120, "train.seeds": [42, 43, 44],
    "compression.allowed_ranks": [1, 2, 4, 8, 16, 32], "compression.acc_tolerance": 0.025,
    "compression.seeds": [42, 123, 456], "compression.variants_to_test": ["per_layer"],
    "compression.variants": ["probe", "per_layer", "per_layer_shuffled"],
    "audit.base_model": "distilbert-base-uncased", "audit.compute_udr": True, "audit.enable_composition_analysis": True,
    "runtime.device": "cpu", "runtime.smoke_max_steps": 50, "runtime.smoke_train_samples": 200,
    "runtime.smoke_eval_samples": 200, "runtime.keep_adapter_weights": False, "runtime.keep_checkpoints": False,
    "bench": {"compression_variants": ["uniform_median", "uniform_p90"], "validation_level": "smoke"},
    "multi_seed": {"enabled": True, "seeds": [42, 43, 44], "parallel": False},
    "output": {"save_artifacts": True, "markdown_report": True},
    "env": {"torch_dtype": "bfloat16", "device_map": "auto"}, "hypothesis": {"primary_metric": "exact_match"},
    "metadata": {"experiment_name": "mechanism_test", "bench_version": "0.5.0"},
}
CAUSAL_VALUES: dict[str, object] = {
    "model.name": "mistralai/Mistral-7B-v0.1", "model.type": "causal_lm", "task.dataset": "gsm8k",
    "task.subset": "main", "task.profile": "gsm8k_causal_lm",
    "task.probe_gate": {"metric": "exact_match", "min_value": 0.15},
    "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
# Keys the reference's code never reads (protocol.py, task_profiles/*.py): accepted, listed as ignored.
NOT_READ_BY_REFERENCE = {"run_type", "bench", "multi_seed", "output", "env", "hypothesis", "metadata",
                         "train.batch_size", "train.num_epochs", "train.max_length", "train.warmup_steps",
                         "train.seeds", "train.report_to", "model.device", "compression.variants"}


def _nested(keys: list[str], values: dict[str, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key in keys:
        section, _, sub = key.partition(".")
        if sub:
            out.setdefault(section, {})[sub] = values[key]  # type: ignore[index]
        else:
            out[section] = values[key]
    return out


def test_key_set_table_covers_all_51_reference_yamls() -> None:
    names = [n for files, _, _ in KEY_SETS for n in files.split()]
    assert len(names) == len(set(names)) == 51


@pytest.mark.parametrize(("files", "kind", "keys"), KEY_SETS, ids=[f.split()[0] for f, _, _ in KEY_SETS])
def test_every_reference_bench_yaml_loads_with_its_meaning(files: str, kind: str, keys: str) -> None:
    from gradience.bench.config import config_from_mapping

    values = dict(REFERENCE_VALUES, **(CAUSAL_VALUES if kind == "causal" else {}))
    key_list = keys.split()
    cfg = config_from_mapping(_nested(key_list, values), files.split()[0])
    assert set(cfg.ignored_keys) == NOT_READ_BY_REFERENCE & set(key_list)
    assert cfg.task_type == ("causal_lm" if kind == "causal" else "classification")
    if kind == "causal" and ("task.profile" in key_list):
        assert cfg.metric == "exact_match" and cfg.text_column == "question" and cfg.answer_column == "answer"
    if "train.learning_rate" in key_list:
        assert cfg.lr == 2e-4
    elif "train.lr" in key_list:
        assert cfg.lr == 5e-5
    if "train.train_samples" in key_list:
        assert cfg.max_train_samples == 2000
    if "task.eval_max_samples" in key_list or "train.eval_samples" in key_list:
        assert cfg.max_eval_samples == 500
    if "compression.seeds" in key_list:
        assert cfg.seed_list() == (42, 123, 456)
    elif "seed" in key_list or "train.seed" in key_list:
        assert cfg.seed_list() == (42,)
    if "compression.variants_to_test" in key_list:
        assert cfg.arms == ("retrain_per_layer",)
    if "task.probe_gate" in key_list:
        assert cfg.probe_gate_min == (0.15 if kind == "causal" else 0.8)
    if "model.torch_dtype" in key_list:
        assert cfg.torch_dtype == "bf16" and cfg.gradient_checkpointing is True
    if "runtime.keep_adapter_weights" in key_list:
        assert cfg.keep_adapter_weights is False
    if "task.generation" in key_list:
        assert cfg.max_new_tokens == 128


@pytest.mark.parametrize(("text", "expected"), [
    ("seed: 1\ntrain: {seed: 2}\n", r"seed \(1\) and train.seed \(2\) say different things"),
    ("train: {learning_rate: 0.1, lr: 0.2}\n", "train.learning_rate"),
    ("compression: {variants_to_test: [per_layr]}\n", "unknown variant 'per_layr'"),
    ("model: {type: seq2seq}\n", "model.type"),
    ("task: {profile: squad}\n", "task.profile"),
    ("model: {type: seqcls}\ntask: {profile: gsm8k_causal_lm}\n", "say different things"),
    ("task: {generation: {do_sample: true}}\n", "decodes greedily"),
    ("task: {probe_gate: {metric: f1, min_value: 0.5}}\n", "the bench measures accuracy"),
    ("model: {torch_dtype: int8}\n", "model.torch_dtype"),
    ("train: {train_sample: 5}\n", "did you mean"),  # a typo of a reference key is still a typo
])
def test_reference_keys_are_checked(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(InputError, match=expected):
        load_bench_config(_write(tmp_path, text))


def test_ignored_keys_are_one_warning_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write(tmp_path, "run_type: x\nmetadata: {a: 1}\n")
    assert load_bench_config(cfg).ignored_keys == ("run_type", "metadata")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["bench", "--config", str(cfg), "--output-dir", str(blocker)]) == 2  # stops before any training
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"gradience bench: warning: {cfg}: ignored (the reference tool does not read them either): " \
                     "run_type, metadata"
    assert err[1].startswith("gradience bench: error:") and len(err) == 2


def test_run_bench_module_flags() -> None:
    from gradience.bench.run_bench import translate_argv

    args, notes = translate_argv(["--config", "c.yaml", "--output", "out", "--smoke", "--ci", "--keep-artifacts",
                                  "--verbose", "--clean-on-pass", "--device=cuda"])
    assert args == ["bench", "--config", "c.yaml", "--output-dir", "out", "--smoke", "--ci", "--device", "cuda"]
    assert notes and "--clean-on-pass" in notes[0]
    import gradience.bench.run_bench  # noqa: F401  (the submodule shadows the package's function name)
    from gradience.bench import run_bench

    assert callable(run_bench)


def test_run_bench_module_runs_as_a_command(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    cfg = _write(tmp_path, "train: {max_steps: 0}\n")
    proc = subprocess.run([sys.executable, "-m", "gradience.bench.run_bench", "--config", str(cfg), "--output",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert proc.returncode == 2 and proc.stderr.startswith("gradience bench: error:"), proc.stderr
    assert "train.max_steps" in proc.stderr and not (tmp_path / "o").exists()
    helped = subprocess.run([sys.executable, "-m", "gradience.bench.run_bench", "--help"], capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert helped.returncode == 0 and "--output-dir" in helped.stdout


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("bn_steps_bigint", "train: {max_steps: " + "9" * 5000 + "}\n", "unusable YAML"),
    ("bn_version_bigint", "bench_version: " + "9" * 5000 + "\n", "unusable YAML"),
    ("bn_arms_uniform_bigint", "arms: ['uniform:" + "9" * 5000 + "']\n", "uniform:K needs a rank"),
    ("bn_arms_uniform_superscript", "arms: ['uniform:²']\n", "uniform:K needs a rank"),
    ("steps_superscript", "train: {max_steps: '²'}\n", "expected an integer"),
    ("seeds_bigint_string", "seeds: '" + "9" * 5000 + "'\n", "expected integers"),
])
def test_giant_and_odd_integers_are_clean_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str,
                                                 text: str, expected: str) -> None:
    code = main(["bench", "--config", str(_write(tmp_path, text)), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert len(err) < 600


@pytest.mark.parametrize("where", ["arms", "flag", "seeds", "version"])
def test_alias_bombs_are_refused_while_reading(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               where: str) -> None:
    from support.hostile import yaml_alias_bomb

    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(yaml_alias_bomb(where))
    started = time.perf_counter()
    code = main(["bench", "--config", str(cfg), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "alias" in err, err
    assert time.perf_counter() - started < 10


def test_shipped_reference_keys_example_means_the_toy(tmp_path: Path) -> None:
    ref = load_bench_config(REPO / "examples" / "bench" / "toy_reference_keys.yaml")
    assert ref.ignored_keys == ("run_type",)
    assert (ref.max_train_samples, ref.max_eval_samples, ref.task_type) == (800, 200, "classification")
    assert ref.arms == ("retrain_median", "retrain_p90", "retrain_per_layer") and ref.probe_gate_min == 0.6
    toy = load_bench_config(REPO / "examples" / "bench" / "toy.yaml")
    assert (ref.model, ref.dataset, ref.probe_r, ref.alpha, ref.max_steps, ref.lr) == (
        toy.model, toy.dataset, toy.probe_r, toy.alpha, toy.max_steps, toy.lr)  # train.learning_rate is train.lr

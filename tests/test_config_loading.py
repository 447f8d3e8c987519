"""Config loading: every input form, alias keys, coercion, merge order, discovery, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from gradience.config import (
    detect_form,
    find_config_in_dir,
    load_config_file,
    normalize_source,
    snapshot_from_sources,
)
from gradience.errors import InputError
from gradience.jsonio import dumps


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- forms -------------------------------------------------------------------------------------------------
def test_canonical_json_sections_and_aliases_inside_sections(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", json.dumps({
        "model_name": "meta-llama/Llama-2-7b-hf", "dataset_name": "gsm8k", "task_profile": "hard_reasoning",
        "optimizer": {"name": "adamw", "lr": "2e-4", "weight_decay": 0.01, "betas": [0.9, 0.95], "eps": 1e-8,
                      "fused": True},
        "lora": {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "dropout": 0.05},
        "training": {"seed": 3, "per_device_train_batch_size": "4", "max_steps": 100, "dtype": "bf16"},
        "my_key": 1,
    }))
    form, data = load_config_file(path)
    assert form == "canonical"
    snap = snapshot_from_sources(config=data)
    assert snap.model_name == "meta-llama/Llama-2-7b-hf" and snap.task_profile == "hard_reasoning"
    assert snap.optimizer.lr == 2e-4 and snap.optimizer.betas == [0.9, 0.95]
    assert snap.optimizer.extras == {"fused": True}
    assert (snap.lora.r, snap.lora.alpha, snap.lora.alpha_over_r) == (16, 32.0, 2.0)
    assert snap.lora.dropout == 0.05
    assert snap.training.batch_size == 4 and snap.training.dtype == "bfloat16"
    assert snap.extras == {"my_key": 1}


def test_yaml_unquoted_scientific_lr_is_coerced(tmp_path: Path) -> None:
    text = "lr: 5e-5\nr: 8\nlora_alpha: 16\ntarget_modules: q_proj, v_proj\nweight_decay: 1.0e-2\n"
    # YAML 1.1 reads 5e-5 (no dot) as a string: the coercion is what makes it a number.
    assert yaml.safe_load(text)["lr"] == "5e-5"
    form, data = load_config_file(write(tmp_path / "c.yaml", text))
    assert form == "flat"
    snap = snapshot_from_sources(config=data)
    assert snap.optimizer.lr == pytest.approx(5e-5) and isinstance(snap.optimizer.lr, float)
    assert snap.optimizer.weight_decay == pytest.approx(0.01)
    assert snap.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(("value", "expected"), [
    ("q_proj,v_proj", ["q_proj", "v_proj"]),
    ("q_proj v_proj  o_proj", ["q_proj", "v_proj", "o_proj"]),
    (" q_proj , v_proj ", ["q_proj", "v_proj"]),
    (["q_proj", "k_proj,v_proj"], ["q_proj", "k_proj", "v_proj"]),
    ({"v_proj", "q_proj"}, ["q_proj", "v_proj"]),  # PEFT's to_dict() gives a set
    (r".*\.(q_proj|v_proj)$", [r".*\.(q_proj|v_proj)$"]),  # a PEFT regex is kept whole
    ("all-linear", ["all-linear"]),
    ([], []),
])
def test_target_modules_forms(value: object, expected: list[str]) -> None:
    assert snapshot_from_sources(config={"targets": value}).lora.target_modules == expected


def test_flat_aliases() -> None:
    snap = snapshot_from_sources(config={
        "learning_rate": 1e-4, "rank": "4", "alpha": 8, "targets": "query,value", "lora_dropout": "0.1",
        "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "num_train_epochs": "3",
        "max_steps": 50, "torch_dtype": "torch.float16", "adam_beta1": 0.8, "adam_beta2": "0.99",
        "adam_epsilon": "1e-6", "optim": "adamw_torch", "seed": "7", "use_rslora": "true",
        "model_name_or_path": "bert-base-uncased", "dataset_name": "glue/sst2", "wandb_project": "x",
    })
    assert snap.optimizer.lr == 1e-4 and snap.optimizer.name == "adamw_torch"
    assert snap.optimizer.betas == [0.8, 0.99] and snap.optimizer.eps == 1e-6
    assert (snap.lora.r, snap.lora.alpha, snap.lora.dropout, snap.lora.use_rslora) == (4, 8.0, 0.1, True)
    assert snap.lora.target_modules == ["query", "value"]
    t = snap.training
    assert (t.batch_size, t.gradient_accumulation, t.epochs, t.max_steps, t.dtype, t.seed) == (
        8, 2, 3.0, 50, "float16", 7)
    assert snap.model_name == "bert-base-uncased" and snap.dataset_name == "glue/sst2"
    assert snap.extras == {"wandb_project": "x"}


def test_one_beta_given_fills_the_other_with_hf_default() -> None:
    assert snapshot_from_sources(config={"adam_beta2": 0.95}).optimizer.betas == [0.9, 0.95]


def test_first_alias_wins_and_the_other_is_kept_in_extras() -> None:
    snap = snapshot_from_sources(config={"learning_rate": 1e-3, "lr": 2e-5})
    assert snap.optimizer.lr == 2e-5
    assert snap.extras == {"learning_rate": 1e-3}


def test_non_integral_rank_is_kept_for_the_rules() -> None:
    assert snapshot_from_sources(config={"r": "8"}).lora.r == 8
    assert snapshot_from_sources(config={"r": 8.0}).lora.r == 8
    assert snapshot_from_sources(config={"r": 8.5}).lora.r == 8.5


def test_check_json_output_can_be_fed_back() -> None:
    inner = snapshot_from_sources(config={"lr": 1e-4, "r": 8, "alpha": 16}).to_dict()
    snap = snapshot_from_sources(config={"schema": "gradience.check/v1", "config": inner})
    assert snap.to_dict() == inner


def test_snapshot_roundtrip_through_to_dict_is_stable() -> None:
    snap = snapshot_from_sources(config={"lr": 3e-4, "r": 16, "alpha": 8, "targets": "q_proj",
                                         "bf16": True, "extra_thing": [1, 2]})
    again = snapshot_from_sources(config=snap.to_dict())
    assert again.to_dict() == snap.to_dict()


# --- real PEFT adapter_config.json and HF training_args.json ----------------------------------------------
def test_real_peft_adapter_config(distilbert_seqcls_adapter_dir: Path) -> None:
    path = distilbert_seqcls_adapter_dir / "adapter_config.json"
    raw = json.loads(path.read_text())
    form, data = load_config_file(path)
    assert form == "peft"
    snap = snapshot_from_sources(peft=data)
    assert snap.lora.r == raw["r"] == 8
    assert snap.lora.alpha == raw["lora_alpha"] == 16
    assert sorted(snap.lora.target_modules or []) == sorted(raw["target_modules"])
    assert snap.lora.dropout == raw["lora_dropout"]
    assert snap.lora.use_rslora is False
    assert snap.model_name == raw["base_model_name_or_path"]
    # PEFT-only keys are kept, in the lora section.
    assert snap.lora.extras["peft_type"] == "LORA" and snap.lora.extras["task_type"] == "SEQ_CLS"
    assert snap.extras == {}


def test_in_memory_peft_to_dict_with_enums_and_sets_is_json_safe() -> None:
    from peft import LoraConfig

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_lin", "v_lin"], task_type="SEQ_CLS")
    raw = cfg.to_dict()
    assert isinstance(raw["target_modules"], set)  # the case this test is about
    snap = snapshot_from_sources(peft=raw)
    assert snap.lora.target_modules == ["q_lin", "v_lin"]
    assert snap.lora.extras["peft_type"] == "LORA"
    json.loads(dumps(snap.to_dict()))  # strict JSON, no enum reprs


def _training_args(tmp_path: Path, **kwargs: object) -> dict:
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], **kwargs)  # type: ignore[arg-type]
    return json.loads(args.to_json_string())


def test_real_training_args_json(tmp_path: Path) -> None:
    data = _training_args(tmp_path, learning_rate=2e-4, per_device_train_batch_size=4,
                          gradient_accumulation_steps=2, weight_decay=0.01, seed=11, num_train_epochs=2,
                          adam_beta2=0.98, warmup_steps=5)
    path = write(tmp_path / "training_args.json", json.dumps(data))
    form, loaded = load_config_file(path)
    assert form == "training_args"
    snap = snapshot_from_sources(training=loaded)
    assert snap.optimizer.lr == 2e-4 and snap.optimizer.weight_decay == 0.01
    assert snap.optimizer.name == data["optim"] and isinstance(snap.optimizer.name, str)
    assert snap.optimizer.betas == [data["adam_beta1"], 0.98] and snap.optimizer.eps == data["adam_epsilon"]
    t = snap.training
    assert (t.seed, t.batch_size, t.gradient_accumulation, t.epochs) == (11, 4, 2, 2.0)
    assert data["max_steps"] == -1 and t.max_steps is None  # -1 means "unset" in HF
    assert t.dtype is None  # neither bf16 nor fp16
    # Unknown TrainingArguments keys are kept, in the training section.
    assert t.extras["warmup_steps"] == 5 and t.extras["lr_scheduler_type"] == data["lr_scheduler_type"]
    assert snap.extras == {}


def test_training_args_max_steps_and_bf16(tmp_path: Path) -> None:
    data = _training_args(tmp_path, max_steps=30)
    data["bf16"] = True  # cannot be enabled on this CPU-only machine; the dump format is what matters
    snap = snapshot_from_sources(training=data)
    assert snap.training.max_steps == 30 and snap.training.dtype == "bfloat16"
    assert snap.training.extras["bf16"] is True


def test_in_memory_training_args_to_dict(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    raw = TrainingArguments(output_dir=str(tmp_path), report_to=[], learning_rate=1e-4).to_dict()
    snap = snapshot_from_sources(training=raw)
    assert snap.optimizer.lr == 1e-4 and isinstance(snap.optimizer.name, str)
    json.loads(dumps(snap.to_dict()))


@pytest.mark.parametrize(("data", "form"), [
    ({"lora": {"r": 8}}, "canonical"),
    ({"optimizer": "adamw", "lr": 1e-4}, "flat"),  # an optimizer *name* is not a section
    ({"peft_type": "LORA", "r": 8}, "peft"),
    ({"output_dir": "x", "per_device_train_batch_size": 8, "optim": "adamw_torch"}, "training_args"),
    ({"output_dir": "x", "lr": 1e-4}, "flat"),
])
def test_detect_form(data: dict, form: str) -> None:
    assert detect_form(data) == form


# --- merge order ------------------------------------------------------------------------------------------
def test_merge_fills_in_order_config_peft_training_and_flags_win() -> None:
    config = {"lr": 1e-5, "model_name": "from-config", "extras": {"who": "config"}}
    peft = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "base_model_name_or_path": "from-peft",
            "target_modules": ["q_proj"]}
    training = {"output_dir": "o", "per_device_train_batch_size": 2, "learning_rate": 5e-5, "seed": 1,
                "optim": "adamw_torch", "weight_decay": 0.0}
    snap = snapshot_from_sources(config=config, peft=peft, training=training)
    assert snap.optimizer.lr == 1e-5            # config beats training
    assert snap.model_name == "from-config"     # config beats peft
    assert snap.lora.r == 8 and snap.lora.alpha == 16  # only peft had them
    assert snap.training.seed == 1              # only training had it
    assert snap.extras == {"who": "config"}

    flagged = snapshot_from_sources(config=config, peft=peft, training=training,
                                    overrides={"lr": 3e-4, "r": 16, "model_name": "flag",
                                               "targets": ["v_proj"]})
    assert flagged.optimizer.lr == 3e-4 and flagged.model_name == "flag"
    assert flagged.lora.r == 16 and flagged.lora.target_modules == ["v_proj"]
    assert flagged.lora.alpha_over_r == 1.0  # recomputed: alpha 16 from peft over r 16 from the flag


def test_peft_fills_before_training() -> None:
    snap = snapshot_from_sources(peft={"peft_type": "LORA", "lora_dropout": 0.1},
                                 training={"output_dir": "o", "lora_dropout": 0.3, "optim": "x",
                                           "logging_steps": 5})
    assert snap.lora.dropout == 0.1


def test_alpha_derived_from_alpha_over_r_when_alpha_missing() -> None:
    snap = snapshot_from_sources(config={"lora": {"r": 8, "alpha_over_r": 2.0}})
    assert snap.lora.alpha == 16.0


# --- bad input ---------------------------------------------------------------------------------------------
def test_uncoercible_value_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "lr: fast\nr: 8\n")
    _, data = load_config_file(path)
    with pytest.raises(InputError) as err:
        snapshot_from_sources(config=data, origins={"config": path})
    assert str(path) in str(err.value) and "'lr'" in str(err.value) and "fast" in str(err.value)


def test_uncoercible_value_in_section_names_dotted_key() -> None:
    with pytest.raises(InputError, match=r"config: key 'lora\.r': cannot read 'eight'"):
        snapshot_from_sources(config={"lora": {"r": "eight"}})


@pytest.mark.parametrize(("data", "key"), [
    ({"use_rslora": "maybe"}, "use_rslora"),
    ({"seed": 1.5}, "seed"),
    ({"lr": "nan"}, "lr"),
    ({"lr": True}, "lr"),
    ({"targets": [1, 2]}, "targets"),
    ({"betas": [0.9]}, "betas"),
    ({"task_profile": "vibes"}, "task_profile"),
    ({"model_name": {"a": 1}}, "model_name"),
])
def test_bad_values(data: dict, key: str) -> None:
    with pytest.raises(InputError, match=f"'{key}'"):
        snapshot_from_sources(peft=data)


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("bad.json", "{not json", "invalid JSON at line 1"),
    ("bad.yaml", "a: [1, 2\nb: 3\n", "invalid YAML"),
    ("list.json", "[1, 2]", "expected a mapping"),
    ("empty.yaml", "   \n", "empty"),
    ("evil.yaml", "x: !!python/object/apply:os.system ['true']\n", "invalid YAML"),
])
def test_bad_files_name_the_file(tmp_path: Path, name: str, content: str, problem: str) -> None:
    path = write(tmp_path / name, content)
    with pytest.raises(InputError) as err:
        load_config_file(path)
    assert str(err.value).startswith(f"{path}: ") and problem in str(err.value)


def test_missing_file_directory_and_binary(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        load_config_file(tmp_path / "nope.json")
    with pytest.raises(InputError, match="is a directory"):
        load_config_file(tmp_path)
    binary = tmp_path / "b.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputError, match="not UTF-8"):
        load_config_file(binary)


def test_cyclic_yaml_aliases_are_refused_not_followed(tmp_path: Path) -> None:
    path = write(tmp_path / "cyc.yaml", "lr: 1e-4\nloop: &a [*a]\n")
    # Refused while loading (the bounded safe loader), before anything can walk the cycle.
    with pytest.raises(InputError, match="recursive alias") as err:
        load_config_file(path)
    assert str(err.value).startswith(f"{path}: ")


def test_billion_laughs_yaml_is_refused(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    with pytest.raises(InputError, match="alias bomb"):
        load_config_file(write(tmp_path / "lol.yaml", "\n".join(lines) + "\n"))


def test_non_mapping_source_is_an_input_error() -> None:
    with pytest.raises(InputError, match="expected a mapping"):
        normalize_source([1, 2])  # type: ignore[arg-type]


# --- discovery ---------------------------------------------------------------------------------------------
def test_discovery_prefers_the_directory_itself(tmp_path: Path) -> None:
    top = write(tmp_path / "adapter_config.json", "{}")
    write(tmp_path / "checkpoint-1" / "adapter_config.json", "{}")
    assert find_config_in_dir(tmp_path, "peft") == top


def test_discovery_searches_below_and_picks_the_shallowest(tmp_path: Path) -> None:
    shallow = write(tmp_path / "a" / "training_args.json", "{}")
    write(tmp_path / "b" / "c" / "training_args.json", "{}")
    assert find_config_in_dir(tmp_path, "training") == shallow


def test_discovery_several_at_same_depth_lists_them(tmp_path: Path) -> None:
    write(tmp_path / "one" / "adapter_config.json", "{}")
    write(tmp_path / "two" / "adapter_config.json", "{}")
    with pytest.raises(InputError) as err:
        find_config_in_dir(tmp_path, "peft")
    message = str(err.value)
    assert "several" in message and "one/adapter_config.json" in message and "two/adapter_config.json" in message


def test_discovery_none_says_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no adapter_config\.json found"):
        find_config_in_dir(tmp_path, "peft")
    with pytest.raises(InputError, match="no such directory"):
        find_config_in_dir(tmp_path / "missing", "peft")


def test_discovery_refuses_pickled_training_args(tmp_path: Path) -> None:
    (tmp_path / "training_args.bin").write_bytes(b"\x80\x04not-to-be-loaded")
    with pytest.raises(InputError, match="pickle"):
        find_config_in_dir(tmp_path, "training")


def test_discovery_accepts_a_file_path(tmp_path: Path) -> None:
    path = write(tmp_path / "my_adapter.json", "{}")
    assert find_config_in_dir(path, "peft") == path


def test_secrets_in_extras_are_redacted() -> None:
    snap = snapshot_from_sources(config={"hub_token": "hf_abcdefghijklmnopqrstuvwxyz", "lr": 1e-4},
                                 training={"output_dir": "o", "optim": "x", "logging_steps": 1,
                                           "hub_token": "<HUB_TOKEN>"})
    assert snap.extras["hub_token"] == "[REDACTED]"
    assert snap.training.extras["hub_token"] == "<HUB_TOKEN>"


def test_task_profile_section_and_spelling() -> None:
    assert snapshot_from_sources(config={"task_profile": {"name": "hard_reasoning", "inferred": False},
                                         "lora": {"r": 8}}).task_profile == "hard_reasoning"
    assert snapshot_from_sources(config={"profile": "Easy-Classification"}).task_profile == "easy_classification"

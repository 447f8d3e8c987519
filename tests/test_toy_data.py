"""The toy run's shipped dataset and the dataset loader (built-in, local files/dirs, hub ids offline)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from gradience.errors import InputError
from gradience.toy import dataset as toy_data

DATA_FILE = Path(toy_data.__file__).parent / "data" / toy_data.BUILTIN_FILE


def test_shipped_file_is_the_generator_output() -> None:
    shipped = [json.loads(line) for line in DATA_FILE.read_text().splitlines() if line.strip()]
    assert shipped == toy_data.generate_tiny_sentiment()


def test_builtin_splits_are_sized_balanced_and_disjoint() -> None:
    data = toy_data.load_builtin()
    assert data.name == "gradience/tiny-sentiment"
    assert (len(data.train_texts), len(data.test_texts)) == (800, 200)
    assert len(data.train_labels) == 800 and len(data.test_labels) == 200
    assert not set(data.train_texts) & set(data.test_texts)
    for labels in (data.train_labels, data.test_labels):
        share = sum(labels) / len(labels)
        assert 0.4 < share < 0.6
    assert data.num_labels == 2


def test_builtin_data_is_learnable_but_not_trivial() -> None:
    """An independent word-count classifier fitted on train: clearly above chance on test (the signal is in
    the words), and clearly below 100% (negations and contrasts need more than word counting)."""
    data = toy_data.load_builtin()
    counts: dict[int, Counter[str]] = {0: Counter(), 1: Counter()}
    for text, label in zip(data.train_texts, data.train_labels, strict=True):
        counts[label].update(text.split())

    def predict(text: str) -> int:
        score = sum((counts[1][w] + 1) / (counts[0][w] + 1) - 1 for w in text.split())
        return int(score > 0)

    acc = sum(predict(t) == y for t, y in zip(data.test_texts, data.test_labels, strict=True)) / 200
    assert 0.7 < acc < 0.97


def test_load_single_csv_holds_out_a_test_split(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sentence", "label"])
        for i in range(50):
            writer.writerow([f"review number {i} was {'good' if i % 2 else 'bad'}", i % 2])
    data = toy_data.load_text_classification(str(path), seed=0)
    assert len(data.train_texts) + len(data.test_texts) == 50
    assert len(data.test_texts) == 10
    assert set(data.train_labels) <= {0, 1}
    assert data.num_labels == 2
    assert all(t.startswith("review number") for t in data.train_texts)


def test_load_directory_of_json_files_with_train_and_test(tmp_path: Path) -> None:
    for split, n in (("train", 30), ("test", 12)):
        rows = [{"text": f"{split} text {i}", "label": i % 3} for i in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = toy_data.load_text_classification(str(tmp_path))
    assert (len(data.train_texts), len(data.test_texts)) == (30, 12)
    assert data.test_texts[0] == "test text 0"
    assert data.num_labels == 3


def test_load_save_to_disk_directory_drops_unlabeled_rows(tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["a b", "c d", "e f"], "label": [0, 1, 0]}),
        "validation": datasets.Dataset.from_dict({"sentence": ["g", "h"], "label": [1, 0]}),
        "test": datasets.Dataset.from_dict({"sentence": ["x", "y"], "label": [-1, -1]}),  # GLUE-style
    })
    dd.save_to_disk(str(tmp_path / "saved"))
    data = toy_data.load_text_classification(str(tmp_path / "saved"))
    assert data.test_split == "validation"  # the unlabeled test split is skipped
    assert data.test_texts == ["g", "h"]
    assert data.train_labels == [0, 1, 0]


def test_missing_columns_is_one_input_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("foo,bar\n1,2\n3,4\n5,6\n7,8\n9,10\n")
    with pytest.raises(InputError, match=r"bad\.csv: no text column found"):
        toy_data.load_text_classification(str(path))


@pytest.mark.parametrize("spec", ["./does/not/exist", "/nonexistent/data.csv", "data.csv"])
def test_missing_local_path_is_an_input_error_not_a_hub_lookup(spec: str) -> None:
    with pytest.raises(InputError, match="does not exist"):
        toy_data.load_text_classification(spec)


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with pytest.raises(InputError, match="unsupported dataset file type"):
        toy_data.load_text_classification(str(path))


@pytest.mark.parametrize("spec", ["glue/sst2", "someone/not-a-cached-dataset"])
def test_hub_dataset_offline_and_not_cached_is_one_clear_error(spec: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(InputError) as info:
        toy_data.load_text_classification(spec)
    message = str(info.value)
    assert message.startswith(f"{spec}: not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE" in message and "save_to_disk" in message and "--dataset DIR" in message


def test_toy_and_demo_modules_import_nothing_heavy_and_script_has_the_seed_flags() -> None:
    import subprocess
    import sys

    code = ("import sys, gradience.toy.run, gradience.toy.model, gradience.cli.demo\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'datasets', 'scipy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr
    script = Path(__file__).resolve().parents[1] / "examples" / "vnext" / "toy_lora_run.py"
    helptext = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                              timeout=60).stdout
    for flag in ("--out", "--device", "--model", "--dataset", "--max-steps", "--r", "--alpha", "--lr",
                 "--targets", "--seed", "--telemetry-allow-text", "--no-audit"):
        assert f"{flag} " in helptext or f"{flag}\n" in helptext, flag


def test_toy_flags_map_to_the_run_config() -> None:
    from gradience.toy.run import ToyRunConfig, build_arg_parser, config_from_args

    cfg = config_from_args(build_arg_parser().parse_args([]))
    assert cfg == ToyRunConfig(progress=True)  # the script prints progress; the library default is quiet
    assert (cfg.out, cfg.device, cfg.model, cfg.dataset) == ("runs/toy", "cpu", "gradience/tiny-distilbert",
                                                            "gradience/tiny-sentiment")
    cfg = config_from_args(build_arg_parser().parse_args([
        "--out", "o", "--max-steps", "7", "--r", "4", "--alpha", "8", "--lr", "1e-4", "--targets", "q_lin, v_lin",
        "--seed", "3", "--telemetry-allow-text", "--no-audit", "--dataset", "imdb", "--model", "bert-base-uncased"]))
    assert (cfg.out, cfg.max_steps, cfg.r, cfg.alpha, cfg.lr, cfg.seed) == ("o", 7, 4, 8.0, 1e-4, 3)
    assert cfg.targets == ["q_lin", "v_lin"]
    assert cfg.telemetry_allow_text is True and cfg.audit is False
    assert (cfg.dataset, cfg.model) == ("imdb", "bert-base-uncased")

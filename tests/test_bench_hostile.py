"""Bench against hostile directories, configs and data (issue 17 items 3 and 6): nothing outside OUT is read or
deleted, bad state is one line that says how to start over, sizes and file modes are what the user asked for,
arms whose ranks coincide run once."""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from gradience.bench.config import load_bench_config
from gradience.cli.main import main
from gradience.jsonio import dumps
from support.hostile import TINY_BENCH_YAML, bench_state, csv_dataset

pytest.importorskip("torch")
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO / "src"))


def _config(tmp_path: Path, body: str = TINY_BENCH_YAML) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(body)
    return p


def _state_for(cfg_path: Path) -> str:
    """The bench_config.json a run of ``gradience bench --config cfg_path`` writes (not smoke)."""
    return dumps(replace(load_bench_config(cfg_path), smoke=False).effective().to_dict()) + "\n"


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if not ln.startswith("bench: ")]
    assert len(lines) == 1 and lines[0].startswith("gradience bench: error:"), err
    return lines[0]


@pytest.mark.parametrize("kind", ["fifo", "dir", "garbage", "latin1", "nested", "devzero"])
def test_resume_with_hostile_state_is_one_line_saying_how_to_start_over(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    """bn_resume_state_*: a FIFO (no hang), a directory, garbage, Latin-1, 100k-deep JSON, /dev/zero."""
    out = tmp_path / "out"
    bench_state(out, kind)
    code = main(["bench", "--config", str(_config(tmp_path)), "--output-dir", str(out), "--resume"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "to start over" in line and f"rm -r {out}" in line


def test_earlier_bench_without_resume_says_how_to_start_over(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "bench_config.json").write_text(_state_for(cfg))
    assert main(["bench", "--config", str(cfg), "--output-dir", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--resume" in line and "to start over" in line
    (out / "bench_config.json").unlink()
    (out / "seed_42").mkdir()  # a failed bench that never wrote its state
    assert main(["bench", "--config", str(cfg), "--output-dir", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "earlier bench" in line and "to start over" in line
    mine = tmp_path / "home"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main(["bench", "--config", str(cfg), "--output-dir", str(mine)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "holds no bench" in line and "rm -r" not in line  # never advise deleting someone's directory


def test_resume_refuses_a_symlinked_seed_dir_and_deletes_nothing_outside(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bn_resume_seed_symlink: before the fix, --resume rmtree'd the probe dir behind the link."""
    cfg = _config(tmp_path)
    outside = tmp_path / "precious"
    (outside / "probe").mkdir(parents=True)
    (outside / "probe" / "thesis.txt").write_text("years of work")
    out = tmp_path / "out"
    out.mkdir()
    (out / "bench_config.json").write_text(_state_for(cfg))
    (out / "seed_42").symlink_to(outside, target_is_directory=True)
    code = main(["bench", "--config", str(cfg), "--output-dir", str(out), "--resume"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "symbolic link" in line
    assert (outside / "probe" / "thesis.txt").read_text() == "years of work"


def test_resume_refuses_a_symlinked_arm_dir_and_deletes_nothing_outside(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bn_resume_arm_symlink: seed_42/probe is a link to a directory outside the bench."""
    cfg = _config(tmp_path)
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "thesis.txt").write_text("years of work")
    out = tmp_path / "out"
    (out / "seed_42").mkdir(parents=True)
    (out / "bench_config.json").write_text(_state_for(cfg))
    (out / "seed_42" / "probe").symlink_to(outside, target_is_directory=True)
    (out / "base").symlink_to(outside, target_is_directory=True)  # never read, never replaced
    code = main(["bench", "--config", str(cfg), "--output-dir", str(out), "--resume"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "base is a symbolic link" in line
    (out / "base").unlink()
    code = main(["bench", "--config", str(cfg), "--output-dir", str(out), "--resume"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "symbolic link" in line
    assert (outside / "thesis.txt").read_text() == "years of work"


def test_config_norms_cache_outside_the_bench_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "elsewhere" / "norms.json"
    cfg = _config(tmp_path, TINY_BENCH_YAML + f"audit: {{compute_udr: true, base_norms_cache: '{target}'}}\n")
    code = main(["bench", "--config", str(cfg), "--output-dir", str(tmp_path / "out")])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "outside the bench directory" in line and "--base-norms-cache" in line
    assert not target.parent.exists()
    cfg = _config(tmp_path, TINY_BENCH_YAML + "audit: {compute_udr: true, base_norms_cache: '../escape.json'}\n")
    assert main(["bench", "--config", str(cfg), "--output-dir", str(tmp_path / "out2")]) == 2
    assert "outside the bench directory" in capsys.readouterr().err


@pytest.mark.parametrize(("labels", "needle"), [(["positive", "negative"], "integer class ids"),
                                                ([0, 999_999_999], "at most 10000")])
def test_dataset_label_problems_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             labels: list[object], needle: str) -> None:
    """bn_dataset_text_label, bn_dataset_huge_label (num_labels 1e9 was a MemoryError)."""
    data = csv_dataset(tmp_path / "data.csv", labels)
    cfg = _config(tmp_path, TINY_BENCH_YAML + f"model: {{name: gradience/tiny-distilbert}}\n"
                                              f"task: {{dataset: '{data}'}}\n")
    code = main(["bench", "--config", str(cfg), "--output-dir", str(tmp_path / "out")])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and needle in line and str(data) in line


@pytest.mark.slow
def test_write_failure_is_one_line(tmp_path: Path) -> None:
    """bn_out_full: the kernel refuses a write (RLIMIT_FSIZE gives EFBIG, as a full disk gives ENOSPC), here
    inside safetensors' Rust writer, which reports it as SafetensorError: one line, exit 2."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    proc = subprocess.run([sys.executable, "-m", "gradience", "bench", "--config", str(_config(tmp_path)),
                           "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          env=ENV, preexec_fn=limit)
    line = _one_error_line(proc.stderr)
    assert proc.returncode == 2 and "cannot write" in line and "File too large" in line
    assert "internal error" not in proc.stderr


@pytest.mark.slow
def test_tiny_bench_sizes_modes_dedupe_and_terminal_output(tmp_path: Path) -> None:
    """bn_tiny_ok + bn_eval_samples + item 3: one real tiny bench, then a resume with a planted result.json."""
    body = TINY_BENCH_YAML.replace("arms: [truncate_median]",
                                   "arms: [truncate_median, truncate_p90, truncate_per_layer, retrain_median, "
                                   "uniform:4]").replace("allowed_ranks: [1, 2, 4]", "allowed_ranks: [4]")
    body = body.replace("task: {max_train_samples: 64, max_eval_samples: 16}",
                        "task: {max_train_samples: 64, max_eval_samples: 16, "
                        "probe_gate: {metric: accuracy, min_value: 0.99}}")
    body += "audit: {compute_udr: true, base_norms_cache: norms.json}\nruntime: {keep_adapter_weights: false}\n"
    body += "model: {gradient_checkpointing: true}\n"  # the reference's memory switch: same training, less memory
    cfg = _config(tmp_path, body)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gradience.bench.run_bench", "--config", str(cfg), "--output", str(out)]
    proc = subprocess.run(["sh", "-c", 'umask 002 && exec "$@"', "sh", *cmd], capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bench = json.loads((out / "bench.json").read_text())
    assert bench["config"]["model_options"]["gradient_checkpointing"] is True
    # Sizes: task.max_eval_samples 16 of the built-in data (was 200).
    assert bench["task"]["n_eval_items"] == 16 and len(bench["probe"]["per_seed"]) == 1
    # Modes: what a plain open gives under umask 002 (safetensors wrote 0600; run.jsonl was 0644).
    for path in [*out.rglob("*.safetensors"), *out.rglob("run.jsonl"), *out.rglob("*.json")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o664, path
    assert (out / "norms.json").is_file()  # a relative cache path from the config lives inside the bench
    # runtime.keep_adapter_weights: false drops the arms' weights at the end (configs and results stay).
    assert not list((out / "seed_42").rglob("*.safetensors"))
    assert (out / "seed_42" / "probe" / "adapter" / "adapter_config.json").is_file()
    # task.probe_gate: the tiny probe (4 steps) does not reach 0.99; recorded, and said on the terminal.
    gate = bench["probe_gate"]
    assert gate["passed"] is False and gate["min_value"] == 0.99
    assert gate["per_seed"][0]["metric"] == bench["probe"]["per_seed"][0]["metric"] < 0.99
    assert "Probe gate (accuracy ≥ 0.99): NOT passed" in proc.stdout
    # Dedupe: with allowed_ranks [4] every truncation keeps r=4 and both trainings train the same LoRA.
    arms = {a["name"]: a for a in bench["arms"]}
    assert arms["truncate_p90"]["per_seed"][0]["same_as"] == "truncate_median"
    assert arms["truncate_per_layer"]["per_seed"][0]["same_as"] == "truncate_median"
    assert arms["uniform:4"]["per_seed"][0]["same_as"] == "retrain_median"
    assert "same_as" not in arms["truncate_median"]["per_seed"][0]
    assert not (out / "seed_42" / "uniform_4" / "adapter").exists()  # trained once, not twice
    assert not (out / "seed_42" / "truncate_p90" / "adapter").exists()
    assert arms["uniform:4"]["per_seed"][0]["metric"] == arms["retrain_median"]["per_seed"][0]["metric"]
    assert proc.stderr.count("not run twice") == 3
    # Terminal: progress starts before training, a plain table (no Markdown pipes), where the outputs are.
    progress = proc.stderr.splitlines()
    assert progress[0].startswith("bench: 1 seed(s)") and "training the probe" in progress[1]
    assert "|" not in proc.stdout and "---" in proc.stdout and "truncate_per_layer" in proc.stdout
    assert f"bench: outputs in {out}: bench.json, bench.md, report.html" in proc.stderr
    assert "| truncate_median |" in (out / "bench.md").read_text()
    # Resume: a result.json pointing its adapter outside OUT is never followed.
    outside = tmp_path / "outside_adapter"
    outside.mkdir()
    result_path = out / "seed_42" / "truncate_median" / "result.json"
    planted = json.loads(result_path.read_text())
    planted["adapter_dir"] = str(outside)
    result_path.write_text(json.dumps(planted))
    resumed = subprocess.run([*cmd, "--resume", "--json"], capture_output=True, text=True, timeout=600, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = json.loads(resumed.stdout)
    dirs = [s["adapter_dir"] for a in again["arms"] for s in a["per_seed"]]
    assert all(Path(d).resolve().is_relative_to(out.resolve()) for d in dirs), dirs
    assert resumed.stderr.count("resumed") == 6  # the probe and the five arms: nothing retrained
    assert again["probe_gate"]["passed"] is False
    # A result.json scored on other items (edited, or from another config) is rerun, not a crash in the CIs.
    retrain_result = out / "seed_42" / "retrain_median" / "result.json"
    planted = json.loads(retrain_result.read_text())
    planted["per_item"] = planted["per_item"][:3]
    retrain_result.write_text(json.dumps(planted))
    third = subprocess.run([*cmd, "--resume", "--json"], capture_output=True, text=True, timeout=600, env=ENV)
    assert third.returncode == 0, third.stderr[-3000:]
    assert third.stderr.count("resumed") == 5 and "Δ=" in third.stderr  # retrain_median ran again
    assert len(json.loads(retrain_result.read_text())["per_item"]) == 16
    # A truncation needs the probe's weights, dropped by keep_adapter_weights: false: one line that says so.
    result_path.write_text(json.dumps(planted))
    fourth = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600, env=ENV)
    line = _one_error_line(fourth.stderr)
    assert fourth.returncode == 2 and "keep_adapter_weights" in line and "to start over" in line


def test_save_pretrained_outputs_get_the_umask_mode(tmp_path: Path) -> None:
    """The demo's peft/ and base/ (toy.run.save_adapter): safetensors creates 0600 whatever the umask."""
    from peft import LoraConfig, get_peft_model

    from gradience.toy.model import build_tiny_classifier
    from gradience.toy.run import save_adapter

    base = build_tiny_classifier(50, 2, 0)
    old = os.umask(0o002)
    try:
        save_adapter(base, tmp_path / "base")
        peft = get_peft_model(build_tiny_classifier(50, 2, 0), LoraConfig(r=2, target_modules=["q_lin"]))
        save_adapter(peft, tmp_path / "peft", save_embedding_layers=False)
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files) and len(files) >= 4
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o664, path
    for d in (tmp_path / "base", tmp_path / "peft"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o775

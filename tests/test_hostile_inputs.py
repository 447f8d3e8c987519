"""Generated hostile-input corpus (issue 9 item 4), run through the real CLI.

Every case must end as a clean one-line error (exit 2, naming the file and the problem) or as a reported
issue — never "internal error", a traceback, a hang (subprocess cases carry a timeout) or unbounded memory.
All inputs are built in tmp dirs by ``support.hostile``; nothing is checked in.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.cli.main import main
from support.hostile import (
    K,
    Q,
    adapter_with_tensors,
    deep_json,
    good_adapter,
    header_file,
    pair,
    raw_safetensors,
    run_subprocess,
    synthetic_base,
    telemetry,
)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert "internal error" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def audit_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    code, out, err = cli(capsys, "audit", *argv, "--json", "--no-udr")
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out)
    return doc


def codes(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {i["code"]: i for i in doc["issues"]}


# -- JSON nested 100k deep, integers over the 4300-digit limit ------------------------------------------------
def test_deep_json_safetensors_header(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = raw_safetensors(tmp_path / "w.safetensors", deep_json())
    code, _, err = cli(capsys, "audit", "--weights", str(f))
    assert_one_line_error(code, err, str(f), "nested too deeply")


def test_deep_json_shard_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "adapter_model.safetensors.index.json"
    f.write_bytes(deep_json())
    code, _, err = cli(capsys, "audit", "--weights", str(f))
    assert_one_line_error(code, err, str(f), "nested too deeply")


def test_deep_json_adapter_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = good_adapter(tmp_path / "a")
    (d / "adapter_config.json").write_bytes(deep_json())
    code, _, err = cli(capsys, "audit", "--peft-dir", str(d))
    assert_one_line_error(code, err, "adapter_config.json", "nested too deeply")


@pytest.mark.parametrize("where", ["shape", "offsets"])
def test_giant_int_in_safetensors_header(tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    big = "1" + "0" * 5000
    shape, offs = (f"[{big}]", "[0, 4]") if where == "shape" else ("[1]", f"[0, {big}]")
    text = f'{{"{Q}.lora_A.weight": {{"dtype": "F32", "shape": {shape}, "data_offsets": {offs}}}}}'
    f = raw_safetensors(tmp_path / "w.safetensors", text.encode(), b"\0" * 4)
    code, _, err = cli(capsys, "audit", "--weights", str(f))
    assert_one_line_error(code, err, str(f), "digits")


def test_giant_int_in_adapter_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = good_adapter(tmp_path / "a")
    (d / "adapter_config.json").write_text('{"r": 1' + "0" * 5000 + ', "lora_alpha": 8}')
    code, _, err = cli(capsys, "audit", "--peft-dir", str(d))
    assert_one_line_error(code, err, "adapter_config.json", "digits")


# -- lora_alpha: 1e308, a 400-digit int, zero ------------------------------------------------------------------
def test_alpha_1e308_is_computed_not_a_crash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = audit_json(capsys, "--peft-dir", str(good_adapter(tmp_path / "a", lora_alpha=1e308)))
    assert doc["n_layers"] == 2


def test_alpha_400_digits_is_unscaled_issue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = good_adapter(tmp_path / "a")
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps(cfg).replace('"lora_alpha": 8', '"lora_alpha": 1' + "0" * 400))
    doc = audit_json(capsys, "--peft-dir", str(d))
    assert "unscaled" in codes(doc) and doc["n_layers"] == 2


def test_alpha_zero_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = audit_json(capsys, "--peft-dir", str(good_adapter(tmp_path / "a", lora_alpha=0)))
    issue = codes(doc)["zero_alpha"]
    assert set(issue["modules"]) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"}
    assert all(row["delta_frob_norm"] == 0.0 for row in doc["layers"])  # scaled to nothing, honestly


# -- base model names and the HF cache -------------------------------------------------------------------------
def test_megabyte_base_model_name_is_an_issue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = good_adapter(tmp_path / "a", base_model_name_or_path="x" * (1 << 20))
    code, out, err = cli(capsys, "audit", "--peft-dir", str(d), "--json")
    assert code == 0, err[:300]
    assert codes(json.loads(out))["base_model_unresolved"]["severity"] == "info"


@pytest.mark.parametrize("ref", [b"\xff\xfe\x00garbage\x1b[2J", b"../../x", b"main\n"])
def test_hf_cache_ref_must_be_a_commit(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch, ref: bytes) -> None:
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    synthetic_base(repo / "snapshots" / ("a" * 40))
    (tmp_path / "x").mkdir()  # what ../../x would reach outside the snapshots dir
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_bytes(ref)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # --require-udr: without it an unresolvable base is a warning issue and the audit still prints (issue 17)
    code, _, err = cli(capsys, "audit", "--peft-dir", str(good_adapter(tmp_path / "a")), "--base-model", "org/tiny",
                       "--require-udr")
    assert_one_line_error(code, err, "refs/main", "does not hold a commit hash")
    assert "\x1b" not in err


@pytest.mark.parametrize("rev", ["../../x", "main/../../etc", "/abs", "a\nb"])
def test_revision_must_be_a_plain_name(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch, rev: str) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = cli(capsys, "audit", "--peft-dir", str(good_adapter(tmp_path / "a")),
                       "--base-model", f"org/tiny@{rev}", "--require-udr")
    assert_one_line_error(code, err, "org/tiny")


# -- rank bombs ------------------------------------------------------------------------------------------------
def test_rank_bomb_is_shape_mismatch_before_any_allocation(tmp_path: Path) -> None:
    """A (100000, 2) with B (3, 100000): 2 MB on disk, a 75 GB Gram if trusted. Run with a 1.5 GB address-space
    cap and a timeout: it must finish, audit the honest pair, and report the bomb as shape_mismatch."""
    tensors = {**pair(K, 4, 16, 16),
               f"{Q}.lora_A.weight": np.ones((100_000, 2), np.float32),
               f"{Q}.lora_B.weight": np.ones((3, 100_000), np.float32)}
    d = adapter_with_tensors(tmp_path / "a", tensors)
    import resource

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    res = run_subprocess(["audit", "--peft-dir", str(d), "--json", "--no-udr"], timeout=120, preexec_fn=cap)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["n_layers"] == 1
    issue = codes(doc)["shape_mismatch"]
    assert issue["modules"] == ["model.layers.0.self_attn.q_proj"] and "exceeds" in issue["message"]


def test_rank_limits_unit() -> None:
    from gradience.adapter.pairs import rank_bound_problem
    from gradience.policy.thresholds import MAX_FACTOR_RANK

    assert rank_bound_problem(8, 16, 2) is None              # PEFT allows r=8 on a 2-class head
    assert rank_bound_problem(64, 4096, 4096) is None
    assert "smaller dimension" in (rank_bound_problem(1000, 2, 3) or "")
    assert rank_bound_problem(100_000, 2, 3) is not None
    assert "limit" in (rank_bound_problem(MAX_FACTOR_RANK + 1, 10**6, 10**6) or "")


# -- non-regular files -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--weights", "--adapter-config"])
def test_fifo_is_refused_not_waited_on(tmp_path: Path, flag: str) -> None:
    d = good_adapter(tmp_path / "a")
    fifo = tmp_path / ("w.safetensors" if flag == "--weights" else "adapter_config.json")
    os.mkfifo(fifo)
    args = ["audit", flag, str(fifo), "--no-udr"] + (["--peft-dir", str(d)] if flag == "--adapter-config" else [])
    res = run_subprocess(args, timeout=60)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "not a regular file" in res.stderr and str(fifo) in res.stderr


@pytest.mark.parametrize("argv", [["check", "/dev/zero"], ["audit", "--adapter-config", "/dev/zero", "--weights", "W"],
                                  ["monitor", "/dev/zero"]])
def test_dev_zero_is_refused(tmp_path: Path, argv: list[str]) -> None:
    d = good_adapter(tmp_path / "a")
    argv = [a.replace("W", str(d / "adapter_model.safetensors")) if a == "W" else a for a in argv]
    res = run_subprocess(argv, timeout=60)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "/dev/zero" in res.stderr and "internal error" not in res.stderr


# -- safetensors layout ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,needle", [
    ([(0, 64), (0, 64)], "overlaps"),
    ([(0, 64), (32, 96)], "overlaps"),
    ([(0, 64), (72, 136)], "gap"),
    ([(8, 72), (72, 136)], "gap"),
])
def test_offsets_must_tile_the_data(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    layout: list[tuple[int, int]], needle: str) -> None:
    header = {f"{Q}.lora_A.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": list(layout[0])},
              f"{Q}.lora_B.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": list(layout[1])}}
    f = header_file(tmp_path / "w.safetensors", header, b"\0" * max(e for _, e in layout))
    code, _, err = cli(capsys, "audit", "--weights", str(f))
    assert_one_line_error(code, err, str(f), needle)


def test_trailing_bytes_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header = {f"{Q}.lora_A.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}
    f = header_file(tmp_path / "w.safetensors", header, b"\0" * 80)
    code, _, err = cli(capsys, "audit", "--weights", str(f))
    assert_one_line_error(code, err, str(f), "cover 64 bytes")


@pytest.mark.parametrize("entry", [{"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]},
                                   {"dtype": "F32", "shape": [1] * 100, "data_offsets": [0, 4]},
                                   {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}])
def test_odd_header_values(tmp_path: Path, capsys: pytest.CaptureFixture[str], entry: dict[str, Any]) -> None:
    f = header_file(tmp_path / "w.safetensors", {f"{Q}.lora_A.weight": entry}, b"\0" * 4)
    code, _, err = cli(capsys, "audit", "--weights", str(f))
    assert_one_line_error(code, err, str(f))


def test_truncated_while_mapped_is_a_clean_error(tmp_path: Path) -> None:
    """The file is cut after the headers were read and the mapping made: no SIGBUS, no numbers."""
    from gradience.adapter import load_adapter
    from gradience.audit import run_audit
    from gradience.errors import InputError

    d = adapter_with_tensors(tmp_path / "a", {**pair(Q, 4, 4096, 4096), **pair(K, 4, 4096, 4096, seed=1)})
    loaded = load_adapter(str(d))
    loaded.pairs[0].load_factors()  # the file is mapped now
    weights = d / "adapter_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(InputError, match="shrank") as err:
        run_audit(loaded)
    assert str(weights) in str(err.value)


# -- norms cache -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mutate", ["iterations_str", "iterations_list", "nan", "bool_size", "deep", "giant_int"])
def test_wrong_typed_norms_cache_is_stale(tmp_path: Path, capsys: pytest.CaptureFixture[str], mutate: str) -> None:
    d = good_adapter(tmp_path / "a")
    base = synthetic_base(tmp_path / "base")
    cache = tmp_path / "norms.json"
    argv = ("audit", "--peft-dir", str(d), "--base-model", str(base), "--base-norms-cache", str(cache), "--json")
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    first = json.loads(out)
    data = json.loads(cache.read_text())
    entries = next(iter(data["bases"].values()))
    for entry in entries.values():
        if mutate == "iterations_str":
            entry["iterations"] = "many"
        elif mutate == "iterations_list":
            entry["iterations"] = [1, 2]
        elif mutate == "bool_size":
            entry["file"][1] = True
    text = json.dumps(data)
    if mutate == "nan":
        text = text.replace('"sigma_max": ', '"sigma_max": NaN, "x": ')
    elif mutate == "deep":
        text = deep_json().decode()
    elif mutate == "giant_int":
        text = text.replace('"rtol": ', '"rtol": 1' + "0" * 5000 + ', "y": ')
    cache.write_text(text)
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    doc = json.loads(out)
    assert "base_norms_cache_corrupt" in codes(doc)
    assert doc["udr_median"] == pytest.approx(first["udr_median"], rel=1e-3)  # recomputed, same answer


def test_unwritable_norms_cache_is_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, out, err = cli(capsys, "audit", "--peft-dir", str(good_adapter(tmp_path / "a")), "--base-model",
                         str(synthetic_base(tmp_path / "base")), "--base-norms-cache", str(blocker / "c.json"),
                         "--json")
    assert code == 0, err
    assert codes(json.loads(out))["base_norms_cache_unwritable"]["severity"] == "warning"


# -- --append --------------------------------------------------------------------------------------------------
def test_append_to_missing_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "nonexistent" / "dir" / "run.jsonl"
    code, out, err = cli(capsys, "audit", "--peft-dir", str(good_adapter(tmp_path / "a")), "--no-udr",
                         "--append", str(target))
    assert_one_line_error(code, err, "does not exist")
    assert not (tmp_path / "nonexistent").exists() and out == ""  # refused before the audit ran


def test_append_under_a_regular_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    code, _, err = cli(capsys, "audit", "--peft-dir", str(good_adapter(tmp_path / "a")), "--no-udr",
                       "--append", str(f / "run.jsonl"))
    assert_one_line_error(code, err, "is not a directory")


def test_writer_on_enospc_leaves_whole_lines(tmp_path: Path) -> None:
    """A disk that fills mid-record: the writer truncates back, the file ends on a whole line, and once space
    is back the next records are whole and readable."""
    import errno

    from gradience.errors import InputError
    from gradience.telemetry import TelemetryReader, TelemetryWriter

    path = tmp_path / "run.jsonl"
    writer = TelemetryWriter(path, run_id="r")
    writer.train_step(1, loss=1.0)
    good = path.read_bytes()

    def half_then_full(fd: int, data: Any) -> int:
        os.write(fd, bytes(data[: len(data) // 2]))
        writer._os_write = full  # type: ignore[method-assign]
        return len(data) // 2

    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    writer._os_write = half_then_full  # type: ignore[method-assign]
    with pytest.raises(InputError, match="No space left"):
        writer.train_step(2, loss=2.0, lr=1e-4, grad_norm=0.5)
    assert path.read_bytes() == good
    writer._os_write = os.write  # type: ignore[method-assign]
    writer.train_step(3, loss=3.0)
    writer.close()
    reader = TelemetryReader(path)
    assert [r.step for r in reader] == [1, 3] and reader.issues == []


# -- demo --out ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["/proc/demo", "file", "under_file"])
def test_demo_out_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    pytest.importorskip("torch")
    f = tmp_path / "f"
    f.write_text("x")
    out = {"/proc/demo": "/proc/demo", "file": str(f), "under_file": str(f / "sub")}[where]
    code, _, err = cli(capsys, "demo", "--out", out)
    assert_one_line_error(code, err, out)


# -- rank_pattern regex and YAML bombs -------------------------------------------------------------------------
def test_catastrophic_rank_pattern_does_not_hang(tmp_path: Path) -> None:
    name = "base_model.model." + "a" * 40
    d = adapter_with_tensors(tmp_path / "a", {**pair(name, 4, 8, 8), **pair(Q, 4, 8, 8)},
                             {"rank_pattern": {"(a+)+b": 2, "q_proj": 4}, "alpha_pattern": {"(a|aa)+c": 1}})
    res = run_subprocess(["audit", "--peft-dir", str(d), "--json", "--no-udr"], timeout=60)
    assert res.returncode == 0, res.stderr
    issues = [i for i in json.loads(res.stdout)["issues"] if i["code"] == "invalid_pattern"]
    assert any("(a+)+b" in i["message"] and "nested quantifiers" in i["message"] for i in issues)
    assert any("(a|aa)+c" in i["message"] for i in issues)


def test_normal_patterns_keep_peft_semantics() -> None:
    from gradience.adapter.config import module_rank, pattern_key

    name = "model.layers.10.self_attn.q_proj"
    assert pattern_key([r"layers\.1\..*", r"layers\.10\..*"], name) == r"layers\.10\..*"
    assert pattern_key(["q_proj"], name) == "q_proj" and pattern_key(["proj"], name) is None
    assert pattern_key([".*(q|v)_proj"], name) == ".*(q|v)_proj"
    assert module_rank({"r": 8, "rank_pattern": {"(a+)+b": 2, "q_proj": 16}}, name) == 16


def test_yaml_alias_bomb_as_target_modules(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["q_proj", "v_proj", "k_proj", "o_proj", "x", "y", "z", "w", "u"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    lines += ["r: 8", "lora_alpha: 16", "target_modules: *a9"]
    f = tmp_path / "lora.yaml"
    f.write_text("\n".join(lines) + "\n")
    res = run_subprocess(["check", str(f)], timeout=60)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "alias bomb" in res.stderr and str(f) in res.stderr


# -- run.jsonl -------------------------------------------------------------------------------------------------
def test_hostile_telemetry_fields_become_line_issues(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    big = "1" + "0" * 5000
    log = telemetry(tmp_path / "run.jsonl", [
        {"event": "run_start", "config": {"optimizer": "adamw", "lora": [8, 16],
                                          "training": {"seed": int("9" * 400)}}, "meta": {}},
        {"event": "train_step", "loss": 1.0, "lr": 1e-4},
        '{"schema": "gradience.vnext.telemetry/v1", "event": "train_step", "run_id": "r1", "step": 3, "loss": '
        + big + "}",
        {"event": "train_step", "loss": int("9" * 400), "lr": "NaN", "grad_norm": [1]},
        {"event": "eval", "split": "test", "metrics": "NaN"},
        {"event": "eval", "split": ["x"], "metrics": {"loss": "Infinity", "accuracy": "high"}},
        {"event": "metrics", "kind": "lora_audit", "metrics": [1, 2]},
        {"event": "alert", "severity": "warning", "code": 5, "message": {"m": 1}, "context": "x"},
        {"event": "run_end", "status": ["ok"]},
        {"event": "train_step", "loss": 0.5},
    ])
    code, out, err = cli(capsys, "monitor", str(log), "--json")
    assert code == 0, err
    doc = json.loads(out)
    lines = {i.get("line") for i in doc["telemetry_issues"] if i["code"] in ("bad_field", "bad_json")}
    assert {1, 3, 4, 5, 6, 7, 8, 9} <= lines
    assert doc["config"]["optimizer"]["name"] is None and doc["config"]["lora"]["r"] is None
    code, out, err = cli(capsys, "monitor", str(log), "--verbose")  # the text renderer survives it too
    assert code == 0 and "internal error" not in err


def test_monitor_on_a_growing_log_ends(tmp_path: Path) -> None:
    """Records appended while the pass runs are not read: the pass is bounded by the size seen at start."""
    from gradience.telemetry import TelemetryReader

    log = telemetry(tmp_path / "run.jsonl", [{"event": "train_step", "loss": 1.0}] * 5)
    reader = TelemetryReader(log)
    seen = 0
    with open(log, "a") as fh:
        for _rec in reader:
            seen += 1
            for _ in range(100):  # a writer faster than the reader
                fh.write(json.dumps({"schema": "gradience.vnext.telemetry/v1", "event": "train_step",
                                     "run_id": "r1", "step": 9, "ts": 1.0}) + "\n")
            fh.flush()
    assert seen == 5 and reader.issues == []


# -- paths -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["audit", "--peft-dir", "P"], ["audit", "--weights", "P"], ["monitor", "P"],
                                  ["check", "P"], ["check", "--peft-dir", "P"],
                                  ["audit", "--peft-dir", "A", "--base-model", "P", "--require-udr"]])
def test_name_too_long(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    long_path = str(tmp_path / ("x" * 300) / ("y" * 5000))
    a = str(good_adapter(tmp_path / "a"))
    argv = [long_path if x == "P" else a if x == "A" else x for x in argv]
    code, _, err = cli(capsys, *argv)
    assert_one_line_error(code, err)
    assert len(err) < 3000  # the 5000-character name is shortened in the one line


def test_unreadable_directory_is_named(tmp_path: Path) -> None:
    """Permission denied: run as an unprivileged user (root reads everything)."""
    if os.geteuid() != 0 and not hasattr(os, "setuid"):
        pytest.skip("needs os.setuid")
    top = Path(os.environ.get("TMPDIR", "/tmp")) / f"gradience_perm_{os.getpid()}"
    top.mkdir(mode=0o755, exist_ok=True)
    try:
        top.chmod(0o755)
        locked = top / "locked"
        good_adapter(locked / "inner")
        locked.chmod(0o700 if os.geteuid() == 0 else 0o000)
        drop = (lambda: os.setuid(65534)) if os.geteuid() == 0 else None
        try:
            res = run_subprocess(["audit", "--peft-dir", str(locked), "--no-udr"], timeout=60, preexec_fn=drop,
                                 cwd="/")
        except PermissionError:
            pytest.skip("the unprivileged user cannot run this environment's python")
        if "No module named" in res.stderr:
            pytest.skip("the unprivileged user cannot read the environment")
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
        assert "Permission denied" in res.stderr and str(locked) in res.stderr
    finally:
        locked.chmod(0o755)
        import shutil

        shutil.rmtree(top, ignore_errors=True)


def test_error_line_with_newline_in_name_stays_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "audit", "--peft-dir", str(tmp_path / "evil\nname\x1b[2J"))
    assert_one_line_error(code, err, "evil\\nname\\x1b[2J")


# -- terminal escapes and surrogates in output -----------------------------------------------------------------
def test_control_characters_in_tensor_names_are_escaped(tmp_path: Path) -> None:
    evil = "base_model.model.model.layers.0.self_attn.q_proj\x1b[2J\x1b]0;owned\x07"
    d = adapter_with_tensors(tmp_path / "a", {**pair(evil, 4, 8, 8), **pair(K, 4, 8, 8)})
    res = run_subprocess(["audit", "--peft-dir", str(d), "--no-udr", "--layers"], timeout=60)
    assert res.returncode == 0, res.stderr
    assert "\x1b" not in res.stdout and "\x07" not in res.stdout
    assert "\\x1b[2J" in res.stdout


@pytest.mark.parametrize("command", ["audit --peft-dir {a} --no-udr --layers --top-wasteful 5",
                                     "compress --peft-dir {a} --rank 2 --out {out}", "compare {a} {a}"])
def test_newline_in_a_tensor_name_keeps_each_row_one_line(tmp_path: Path, command: str) -> None:
    evil = "base_model.model.model.layers.0.self_attn.q_proj\nFAKE ROW"
    d = adapter_with_tensors(tmp_path / "a", {**pair(evil, 4, 8, 8), **pair(K, 4, 8, 8)})
    argv = [w.format(a=d, out=tmp_path / "out") for w in command.split()]
    res = run_subprocess(argv, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "q_proj\\nFAKE ROW" in res.stdout
    assert not [line for line in res.stdout.splitlines() if line.startswith("FAKE ROW")]


def test_lone_surrogates_in_names_print(tmp_path: Path) -> None:
    bad = Q + "\\ud800x"  # a JSON escape: the header decodes to a lone surrogate
    header = {f"{bad}.lora_A.weight": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128]},
              f"{bad}.lora_B.weight": {"dtype": "F32", "shape": [8, 4], "data_offsets": [128, 256]}}
    d = tmp_path / "a"
    d.mkdir()
    raw_safetensors(d / "adapter_model.safetensors", json.dumps(header).replace("\\\\ud800", "\\ud800").encode(),
                    np.ones(64, np.float32).tobytes())
    (d / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj\\udc80"]}')
    for extra in ([], ["--json"]):
        res = run_subprocess(["audit", "--peft-dir", str(d), "--no-udr", "--layers", *extra], timeout=60)
        assert res.returncode == 0, res.stderr
        assert "\\ud800" in res.stdout
    assert json.loads(res.stdout)["layers"][0]["name"].endswith("\ud800x")


def test_alert_messages_are_escaped_in_monitor_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = telemetry(tmp_path / "run.jsonl", [
        {"event": "train_step", "loss": 1.0},
        {"event": "alert", "severity": "warning", "code": "x\x1b[31m", "message": "boom \x1b]0;title\x07 \x1b[2J",
         "context": {}},
    ])
    code, out, err = cli(capsys, "monitor", str(log), "--verbose")
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out and "\\x1b[2J" in out


def test_stat_constants_sanity() -> None:
    # The refusal paths above rely on stat telling FIFOs and devices from regular files.
    assert stat.S_ISCHR(os.stat("/dev/zero").st_mode)


@pytest.mark.parametrize("name,text,needle", [
    ("big.json", '{"learning_rate": 1' + "0" * 400 + ', "r": 8}', "out of range"),
    ("big.yaml", "r: 8\nlearning_rate: 1" + "0" * 5000 + "\n", "digits"),
    ("deep.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("deep.yaml", "a:\n" + "".join("  " * i + "- \n" for i in range(1, 300)), "YAML"),
])
def test_check_config_giant_numbers_and_nesting(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str,
                                                text: str, needle: str) -> None:
    f = tmp_path / name
    f.write_text(text)
    code, _, err = cli(capsys, "check", str(f))
    assert_one_line_error(code, err, str(f), needle)


def test_trainer_state_with_odd_types(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    big = int("9" * 400)
    state = {"log_history": [{"step": 1, "loss": [1], "learning_rate": "x", "grad_norm": {"a": 1}},
                             {"step": 2, "loss": big, "epoch": "NaN"},
                             {"step": 3, "eval_loss": 1.0, "eval_accuracy": [1], "eval_runtime": big},
                             {"step": 4, "loss": 0.5, "learning_rate": 1e-4}],
             "train_batch_size": "8", "max_steps": 10**400, "num_train_epochs": big}
    f = tmp_path / "trainer_state.json"
    f.write_text(json.dumps(state))
    code, out, err = cli(capsys, "monitor", str(f), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert {i["index"] for i in doc["telemetry_issues"] if i["code"] == "bad_log_entry"} == {0, 1, 2}
    code, out, err = cli(capsys, "monitor", str(f))
    assert code == 0, err


# -- issue 17: compare's audit JSON (cm_json_*) ----------------------------------------------------------------
@pytest.mark.parametrize("case,needle", [
    ("bigint", "more than 4300 digits"),
    ("alpha_bigint", "adapter.lora_alpha"),
    ("deep_targets", "nested too deeply"),
    ("multi_list", "several adapter audits (1, 2)"),
    ("nested", "nested too deeply"),
    ("nested_obj", "nested too deeply"),
    ("r_bigint", "layers[0].r"),
    ("summary_bigint", "utilization_mean"),
    ("util_bigint", "layers[0].utilization"),
])
def test_compare_hostile_audit_json(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str,
                                    needle: str) -> None:
    from support.hostile import audit_json_doc, mutated_audit_json

    good = audit_json_doc(good_adapter(tmp_path / "a"))
    (tmp_path / "good.json").write_text(json.dumps(good))
    bad = tmp_path / "bad.json"
    bad.write_text(mutated_audit_json(case, good))
    for argv in ([str(bad), str(tmp_path / "good.json")], [str(tmp_path / "good.json"), str(bad), "--json",
                                                              "--fail-on", "r_delta>1,utilization_mean_delta>1"]):
        code, out, err = cli(capsys, "compare", *argv)
        assert_one_line_error(code, err, str(bad), needle)
        assert out == ""


def test_compare_huge_audit_json_is_refused_before_decoding(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """cm_json_300mb: 24M tiny rows would take gigabytes once decoded. The same refusal at a scaled-down limit
    (the real limits are measured in the report: 195 MB / 15M rows refused in 1.0 s at 413 MB peak RSS)."""
    import gradience.compare.sides as sides
    from support.hostile import audit_json_doc

    good = audit_json_doc(good_adapter(tmp_path / "a"))
    (tmp_path / "good.json").write_text(json.dumps(good))
    big = tmp_path / "big.json"
    big.write_text(json.dumps({**good, "layers": [{"name": f"m{i}"} for i in range(5000)]}))
    real_items = sides.MAX_AUDIT_JSON_ITEMS
    monkeypatch.setattr(sides, "MAX_AUDIT_JSON_ITEMS", 4000)
    code, _, err = cli(capsys, "compare", str(big), str(tmp_path / "good.json"))
    assert_one_line_error(code, err, str(big), "refused before decoding")
    monkeypatch.setattr(sides, "MAX_AUDIT_JSON_BYTES", 1000)
    code, _, err = cli(capsys, "compare", str(big), str(tmp_path / "good.json"))
    assert_one_line_error(code, err, str(big), "more than the 1000 bytes")
    # the real limits hold a real large audit: 80 layers x 7 modules with 64 sigmas each
    assert real_items > 80 * 7 * (64 + 40)


# -- issue 17: run.jsonl (rj_*) --------------------------------------------------------------------------------
def _lora_audit_event(**metrics: Any) -> dict[str, Any]:
    return {"event": "metrics", "kind": "lora_audit",
            "metrics": {"total_lora_params": 1000, "suggested_r_global_median": 4, "adapter": {"r": 8}, **metrics}}


@pytest.mark.parametrize("case,metrics", [
    ("inf_params", {"total_lora_params": "Infinity"}),
    ("inf_rank", {"suggested_r_global_median": "Infinity"}),
    ("nan_rank", {"suggested_r_global_median": "NaN"}),
    ("nan_r", {"adapter": {"r": "NaN"}}),
    ("bigint_params", {"total_lora_params": 10**400}),
])
def test_monitor_logged_audit_with_non_finite_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     case: str, metrics: dict[str, Any]) -> None:
    log = telemetry(tmp_path / "run.jsonl", [{"event": "run_start", "config": {}}, _lora_audit_event(**metrics),
                                             {"event": "train_step", "loss": 1.0}])
    for fmt in ((), ("--json",)):
        code, out, err = cli(capsys, "monitor", str(log), *fmt)
        assert code == 0, err
        assert "internal error" not in err
    audit = json.loads(out)["audit"]
    if case in ("inf_rank", "nan_rank"):
        assert "median" not in audit["suggested"]  # no rank is suggested from a non-finite one
    else:
        assert audit["suggested"]["median"]["r"] == 4 and audit["suggested"]["median"]["params"] is None


def test_monitor_record_nested_600_deep_is_a_reported_line(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from support.hostile import deep_list

    log = telemetry(tmp_path / "run.jsonl", [{"event": "run_start", "config": {"x": deep_list(600)}},
                                             {"event": "train_step", "loss": 1.0}])
    code, out, err = cli(capsys, "monitor", str(log), "--json")
    assert code == 0, err
    issue = next(i for i in json.loads(out)["telemetry_issues"] if i["code"] == "bad_json")
    assert issue["line"] == 1 and "nested too deeply" in issue["message"]


@pytest.mark.parametrize("field", ["step", "ts"])
def test_monitor_bigint_step_and_ts(tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str) -> None:
    from gradience.telemetry import TelemetryReader

    rec = {"schema": "gradience.vnext.telemetry/v1", "ts": 1.0, "run_id": "r", "event": "train_step", "step": 1,
           "loss": 1.0, field: 10**400}
    log = tmp_path / "run.jsonl"
    log.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "step": 2, field: 2}) + "\n")
    records = list(TelemetryReader(log))
    assert getattr(records[0], field) is None and getattr(records[1], field) == 2
    for fmt in ((), ("--json",)):
        code, _, err = cli(capsys, "monitor", str(log), *fmt)
        assert code == 0 and "internal error" not in err, err


# -- issue 17: writers ----------------------------------------------------------------------------------------
def test_append_audit_of_config_nested_600_deep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """w_append_nested_nan: a NaN 600 lists deep in adapter_config.json reached the redactor's recursion."""
    from support.hostile import deep_list

    d = good_adapter(tmp_path / "a")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["extra_field"] = deep_list(600)
    (d / "adapter_config.json").write_text(json.dumps(cfg).replace('"NaN"', "NaN"))
    log = tmp_path / "run.jsonl"
    code, _, err = cli(capsys, "audit", "--peft-dir", str(d), "--no-udr", "--append", str(log))
    assert_one_line_error(code, err, "adapter_config.json", "nested too deeply")
    assert not log.exists()


def test_writer_refuses_a_payload_nested_too_deeply(tmp_path: Path) -> None:
    from gradience.telemetry import TelemetryWriter
    from support.hostile import deep_list

    path = tmp_path / "run.jsonl"
    with TelemetryWriter(path, run_id="r") as writer, pytest.raises(ValueError, match="nested too deeply"):
        writer.metrics("custom", {"x": deep_list(600, float("nan"))})
    assert all(json.loads(line)["event"] != "metrics" for line in path.read_text().splitlines())


# -- issue 17: the norms cache holding another base's NaN entry ------------------------------------------------
def test_norms_cache_with_nan_entry_of_another_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "norms.json"
    cache.write_text('{"schema": "gradience.base_norms/v1", "bases": {"other": {"t|F32": {"file": ["x", 1, 2], '
                     '"sigma_max": NaN, "frob_norm": 1.0, "rtol": 0.001, "iterations": 3}, "u|F32": {"file": '
                     '["x", 1, 2], "sigma_max": 2.0, "frob_norm": 3.0, "rtol": 0.001, "iterations": 3}}, '
                     '"junk": 7}}')
    argv = ("audit", "--peft-dir", str(good_adapter(tmp_path / "a")), "--base-model",
            str(synthetic_base(tmp_path / "base")), "--base-norms-cache", str(cache), "--json")
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    assert json.loads(out)["udr_median"] is not None
    written = json.loads(cache.read_text())  # strict JSON again; the valid entry of the other base is kept
    assert list(written["bases"]["other"]) == ["u|F32"] and "junk" not in written["bases"]
    assert len(next(v for k, v in written["bases"].items() if k != "other")) == 2


# -- issue 17: YAML / flag numbers ----------------------------------------------------------------------------
@pytest.mark.parametrize("text,needle", [
    ("r: 8\nlora_alpha: 16\nextras:\n  x: 0x" + "f" * 5000 + "\n", "6021 digits"),
    ("model_name: 0x" + "f" * 5000 + "\nr: 8\n", "key 'model_name'"),
    ("r: 1.0e+308\nlora_alpha: 16\n", "key 'r': rank 1e+308 is out of range"),
])
def test_check_yaml_huge_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                 needle: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    for fmt in ((), ("--json",)):
        code, _, err = cli(capsys, "check", str(f), *fmt)
        assert_one_line_error(code, err, str(f), needle)


def test_check_flag_r_1e308(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "check", "--r", "1e308", "--alpha", "16")
    assert_one_line_error(code, err, "'r'", "out of range")


# -- issue 17: a full disk under save_pretrained (w_demo_out_full) --------------------------------------------
@pytest.mark.slow
def test_save_adapter_on_a_full_disk_is_an_input_error(tmp_path: Path) -> None:
    from gradience.errors import InputError
    from support.hostile import tiny_full_disk, unmount

    pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    from gradience.toy.run import save_adapter

    disk = tmp_path / "disk"
    if not tiny_full_disk(disk):
        pytest.skip("needs root and tmpfs to make a full disk")
    try:
        cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4)
        model = LlamaForCausalLM(cfg)  # ~0.2 MB of fp32 weights: more than the 64 KiB disk holds
        with pytest.raises(InputError, match="No space left on device") as err:
            save_adapter(model, disk / "out" / "base")
        assert str(disk / "out" / "base") in str(err.value)
        assert not (disk / "out" / "base").exists() and [p.name for p in (disk / "out").iterdir()] == []
    finally:
        unmount(disk)


# -- issue 17: a corrupt refs/main in the HF cache (bm_hub_ref_*) ---------------------------------------------
@pytest.mark.parametrize("ref,needle", [(b"\xff\xfe\x00garbage\x1b[2J", "14 bytes of binary data"),
                                        (b"../../x", "a path ('../../x', not followed)"),
                                        (b"", "but nothing")])
def test_hf_cache_ref_problem_is_said_safely(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ref: bytes,
                                             needle: str) -> None:
    from gradience.errors import InputError
    from gradience.udr.resolve import resolve_base

    cache = tmp_path / "hub"
    repo = cache / "models--org--m"
    synthetic_base(repo / "snapshots" / ("a" * 40))
    synthetic_base(tmp_path / "x")  # what ../../x would reach if it were followed
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_bytes(ref + b"\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError) as err:
        resolve_base("org/m")
    message = str(err.value)
    assert needle in message and "does not hold a commit hash" in message and "models--org--m" in message
    assert "\x1b" not in message and "\\\\" not in message and "\n" not in message


# -- issue 17: --adapter-config naming nothing (p_nonexistent_cfg) ---------------------------------------------
def test_missing_adapter_config_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for cfg in (tmp_path / "nope" / "adapter_config.json", tmp_path / "adapter_config.json"):
        code, _, err = cli(capsys, "audit", "--adapter-config", str(cfg))
        assert_one_line_error(code, err, str(cfg), "adapter config not found")
        assert "weights" not in err


# -- issue 17, beyond the list: hostile adapter_config values against the wave-3 commands -----------------------
_CONFIG_CASES = {
    "alpha_5000_digits": ('"lora_alpha": 8', '"lora_alpha": 1' + "0" * 5000),
    "alpha_inf": ('"lora_alpha": 8', '"lora_alpha": Infinity'),
    "r_nan": ('"r": 4', '"r": NaN'),
    "rank_pattern_text": ('"rank_pattern": {}', '"rank_pattern": {"q_proj": "x"}'),
    "alpha_pattern_nan": ('"alpha_pattern": {}', '"alpha_pattern": {"q_proj": NaN}'),
    "nested_600": ('"r": 4', '"r": 4, "extra": ' + "[" * 600 + "]" * 600),
}


@pytest.mark.parametrize("case", sorted(_CONFIG_CASES))
def test_wave3_commands_on_hostile_adapter_configs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    case: str) -> None:
    good = good_adapter(tmp_path / "good", rank_pattern={}, alpha_pattern={})
    bad = good_adapter(tmp_path / "bad", rank_pattern={}, alpha_pattern={})
    cfg_path = bad / "adapter_config.json"
    old, new = _CONFIG_CASES[case]
    text = json.dumps(json.loads(cfg_path.read_text()))
    assert old in text
    cfg_path.write_text(text.replace(old, new, 1))
    base = synthetic_base(tmp_path / "base")
    for argv in (["merge", str(good), str(bad), "--out", str(tmp_path / "m"), "--json"],
                 ["verify", "--peft-dir", str(bad), "--base-model", str(base), "--json"],
                 ["compress", "--peft-dir", str(bad), "--out", str(tmp_path / "c"), "--rank", "2", "--json"],
                 ["audit", "--peft-dir", str(bad), "--json", "--no-udr"]):
        code, out, err = cli(capsys, *argv)
        assert "internal error" not in err and "Traceback" not in err, (argv[0], err)
        if code == 2:
            assert_one_line_error(code, err, str(bad))
        else:
            assert code in (0, 1) and json.loads(out)["schema"], (argv[0], err)


def test_check_json_config_nested_300_deep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Within Python's decoder limit, beyond the shared bound: refused at the read, naming the place."""
    from support.hostile import deep_list

    f = tmp_path / "c.json"
    f.write_text(json.dumps({"r": 8, "x": deep_list(300, 1)}))
    code, _, err = cli(capsys, "check", str(f))
    assert_one_line_error(code, err, str(f), "nested too deeply", "at x[0]")


def test_trainer_state_bigint_step_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "trainer_state.json"
    f.write_text(json.dumps({"log_history": [{"step": 10**400, "loss": 1.0}, {"step": 2, "loss": 0.5}]}))
    code, out, err = cli(capsys, "monitor", str(f), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["training"]["last_step"] == 2 and len(str(doc["training"]["first_step"])) < 20
    assert [i["index"] for i in doc["telemetry_issues"] if i["code"] == "bad_log_entry"] == [0]


@pytest.mark.parametrize("reference", [False, True])
def test_compare_audit_json_with_a_module_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                reference: bool) -> None:
    from support.hostile import audit_json_doc, reference_audit_json

    good = audit_json_doc(good_adapter(tmp_path / "a"))
    (tmp_path / "good.json").write_text(json.dumps(good))
    if reference:  # "base_model.model.X" and "X" are the same module once the PEFT prefix is stripped
        doc: dict[str, Any] = reference_audit_json(good)
        rows = doc["layer_data"]["layer_rows"]
        rows.append({**rows[0], "name": rows[0]["name"][len("base_model.model."):]})
    else:
        doc = {**good, "layers": [*good["layers"], good["layers"][0]]}
    bad = tmp_path / "dup.json"
    bad.write_text(json.dumps(doc))
    code, _, err = cli(capsys, "compare", str(bad), str(tmp_path / "good.json"))
    assert_one_line_error(code, err, str(bad), "rows 0 and 2 are both module")

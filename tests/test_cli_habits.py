"""Commands that meet people's habits (issue 17 items 1 and 3): the base saved beside an adapter, uncached hub
ids failing in seconds, --json errors leaving stdout empty, --require-udr, positional adapters, no flag
abbreviations, "did you mean", lazy command parsers, install hints for this checkout, the demo's fresh log.

UDR values are checked against a dense numpy computation on the files themselves (‖s·B·A‖₂ / ‖W‖₂).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from gradience.cli.main import COMMAND_MODULES, build_parser, main
from gradience.errors import MissingDependencyError
from support.hostile import good_adapter, synthetic_base

REPO = Path(__file__).resolve().parents[1]


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        rc = main(list(args))
    except SystemExit as exc:  # argparse's usage errors exit from the parser, as before
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    """The toy run / demo / bench layout: <run>/peft (the adapter) beside <run>/base (its base checkpoint)."""
    run = tmp_path / "run"
    good_adapter(run / "peft")
    synthetic_base(run / "base")
    return run


def dense_udr(adapter: Path, base: Path) -> dict[str, float]:
    """‖s·B·A‖₂ / ‖W‖₂ per module, dense, from the files (independent of gradience's readers and SVD path)."""
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    weights = load_file(str(base / "model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    out = {}
    for key in tensors:
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            delta = scale * tensors[key.replace(".lora_A.", ".lora_B.")].astype(np.float64) @ tensors[key]
            out[module] = float(np.linalg.norm(delta, 2) / np.linalg.norm(weights[module + ".weight"], 2))
    return out


# --- item 1: the base beside the adapter, one resolver --------------------------------------------------------

def test_audit_uses_the_base_saved_beside_the_adapter_and_says_so(run_dir: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli(capsys, "audit", "--peft-dir", str(run_dir / "peft"), "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["udr_base_model"] == str(run_dir / "base")
    (said,) = [i for i in doc["issues"] if i["code"] == "base_model_beside_adapter"]
    assert str(run_dir / "base") in said["message"] and said["severity"] == "info"
    expected = dense_udr(run_dir / "peft", run_dir / "base")
    got = {row["name"]: row["udr"] for row in doc["layers"]}
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-4)  # SPEC §4: ‖W‖₂ to relative 1e-4
    # the same numbers as naming the base explicitly (and then nothing is said about a base beside it)
    rc, out2, _ = cli(capsys, "audit", "--peft-dir", str(run_dir / "peft"), "--base-model", str(run_dir / "base"),
                      "--json")
    explicit = json.loads(out2)
    assert [r["udr"] for r in explicit["layers"]] == [r["udr"] for r in doc["layers"]]
    assert not [i for i in explicit["issues"] if i["code"] == "base_model_beside_adapter"]
    # --no-udr still means none
    rc, out3, _ = cli(capsys, "audit", "--peft-dir", str(run_dir / "peft"), "--no-udr", "--json")
    assert json.loads(out3)["udr_median"] is None


def test_text_output_names_the_base_it_used(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli(capsys, "audit", str(run_dir / "peft"))
    assert rc == 0 and f"base: {run_dir / 'base'}" in out and "saved beside the adapter" in out


def test_compare_gets_udr_from_the_bases_beside_both_adapters(run_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other"
    good_adapter(other / "peft")
    synthetic_base(other / "base")
    rc, out, _ = cli(capsys, "compare", str(run_dir / "peft"), str(other / "peft"), "--json")
    assert rc == 0
    doc = json.loads(out)
    text = json.dumps(doc)
    assert str(run_dir / "base") in text and str(other / "base") in text


def test_one_resolver_for_the_saved_base(run_dir: Path, tmp_path: Path) -> None:
    from gradience.report.build import _run_base
    from gradience.udr.resolve import base_beside_adapter, saved_base_in

    assert saved_base_in(run_dir) == run_dir / "base" == _run_base(run_dir)
    assert base_beside_adapter(run_dir / "peft") == run_dir / "base"
    assert base_beside_adapter(str(run_dir / "peft") + "/") == run_dir / "base"  # trailing slash
    (tmp_path / "nobase" / "base").mkdir(parents=True)  # a base/ without config.json + weights is no base
    assert saved_base_in(tmp_path / "nobase") is None and base_beside_adapter(None) is None
    # the bench's layout: OUT/base and OUT/seed_<S>/<arm>/adapter; nothing else up the tree is searched
    bench = tmp_path / "bench"
    synthetic_base(bench / "base")
    good_adapter(bench / "seed_1" / "probe" / "adapter")
    good_adapter(bench / "elsewhere" / "probe" / "adapter")
    assert base_beside_adapter(bench / "seed_1" / "probe" / "adapter") == (bench / "base").absolute()
    assert base_beside_adapter(bench / "elsewhere" / "probe" / "adapter") is None


# --- item 1: unresolvable bases, --require-udr, --json errors ---------------------------------------------------

def test_unresolvable_explicit_base_keeps_the_audit_unless_require_udr(run_dir: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    peft = str(run_dir / "peft")
    rc, out, err = cli(capsys, "audit", peft, "--base-model", "org/not-cached-anywhere", "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["udr_median"] is None and all(row["udr"] is None for row in doc["layers"])
    (issue,) = [i for i in doc["issues"] if i["code"] == "base_model_unresolved"]
    assert issue["severity"] == "warning" and "save_pretrained" in issue["message"]
    assert err.startswith("gradience audit: warning: ") and err.count("\n") == 1
    rc, out, err = cli(capsys, "audit", peft, "--base-model", "org/not-cached-anywhere", "--json", "--require-udr")
    assert rc == 2 and out == "" and err.startswith("gradience audit: error: ") and err.count("\n") == 1
    # without any base (no hint, nothing beside it) --require-udr is exit 2 as well; with one it passes
    bare = run_dir.parent / "bare"
    good_adapter(bare)
    rc, out, err = cli(capsys, "audit", str(bare), "--json", "--require-udr")
    assert rc == 2 and out == "" and "--require-udr" in err
    rc, out, _ = cli(capsys, "audit", peft, "--json", "--require-udr")
    assert rc == 0 and json.loads(out)["n_layers_with_udr"] == 2


def test_json_error_after_the_document_was_built_prints_nothing_on_stdout(run_dir: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # --emit-config is written after the JSON is rendered; a target that is a directory fails then.
    target = run_dir / "cfg.yaml"
    target.mkdir()
    rc, out, err = cli(capsys, "audit", str(run_dir / "peft"), "--json", "--emit-config", str(target))
    assert rc == 2 and out == "" and err.startswith("gradience audit: error: ")
    # the same run without the failing part prints the document
    rc, out, _ = cli(capsys, "audit", str(run_dir / "peft"), "--json")
    assert rc == 0 and json.loads(out)["schema"] == "gradience.audit/v1"


@pytest.mark.parametrize("command", ["audit", "compare", "compress", "monitor", "check"])
def test_json_input_errors_leave_stdout_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              command: str) -> None:
    missing = str(tmp_path / "missing")
    argv = {"audit": ["audit", missing], "compare": ["compare", missing, missing],
            "compress": ["compress", missing, "--rank", "1", "--dry-run"], "monitor": ["monitor", missing],
            "check": ["check", missing]}[command]
    rc, out, err = cli(capsys, *argv, "--json")
    assert rc == 2 and out == "" and err.startswith(f"gradience {command}: error: ")


# --- item 1: uncached hub ids fail in seconds, everywhere ------------------------------------------------------

def _no_hub_env(tmp_path: Path) -> dict[str, str]:
    """Online mode (no HF_*_OFFLINE) with a hub endpoint that refuses connections: what a machine without network
    looks like to huggingface_hub, which would retry for about a minute."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), HTTPS_PROXY="", https_proxy="")
    return env


@pytest.mark.slow
@pytest.mark.parametrize("case", ["audit", "toy_model", "toy_dataset"])
def test_uncached_hub_id_fails_fast_with_how_to_proceed(tmp_path: Path, case: str) -> None:
    good_adapter(tmp_path / "peft")
    script = str(REPO / "examples" / "vnext" / "toy_lora_run.py")
    args = {"audit": [sys.executable, "-m", "gradience", "audit", str(tmp_path / "peft"), "--base-model",
                      "org/not-cached", "--require-udr"],
            "toy_model": [sys.executable, script, "--out", str(tmp_path / "o"), "--model", "org/not-cached"],
            "toy_dataset": [sys.executable, script, "--out", str(tmp_path / "o"), "--dataset", "org/not-cached"],
            }[case]
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=_no_hub_env(tmp_path), timeout=120)
    took = time.perf_counter() - started
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "org/not-cached" in lines[0] and "not reachable" in lines[0], proc.stderr
    assert ("save_to_disk(DIR) and pass --dataset DIR" if case == "toy_dataset" else "save_pretrained") in lines[0]
    assert took < 5.0 + 10.0 * (case != "audit")  # the toy script's own start-up imports torch; the check is < 1 s


def test_hub_probe_and_cache_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gradience.errors import InputError
    from gradience.io import hub
    from support.tiny_models import make_hf_cache_layout

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "_reachable", {})
    started = time.perf_counter()
    assert hub.hub_reachable() is False and time.perf_counter() - started < 5.0
    with pytest.raises(InputError, match=r"not reachable.*save_pretrained"):
        hub.require_hub_id_available("org/none", flag="--model")
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    make_hf_cache_layout(model, tmp_path / "hub", repo_id="org/cached")
    assert hub.require_hub_id_available("org/cached") is True  # cached + unreachable: load it offline


# --- item 3: positional adapters, no abbreviations, did you mean -------------------------------------------------

def test_positional_adapter_is_the_same_as_peft_dir(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    peft = str(run_dir / "peft")
    _, by_flag, _ = cli(capsys, "audit", "--peft-dir", peft, "--json")
    _, positional, _ = cli(capsys, "audit", peft, "--json")
    assert json.loads(by_flag) == json.loads(positional)
    _, by_flag, _ = cli(capsys, "compress", "--peft-dir", peft, "--rank", "1", "--dry-run", "--json")
    _, positional, _ = cli(capsys, "compress", peft, "--rank", "1", "--dry-run", "--json")
    assert json.loads(by_flag)["layers"] == json.loads(positional)["layers"]
    rc, out, err = cli(capsys, "audit", peft, "--peft-dir", str(run_dir / "base"))
    assert rc == 2 and out == "" and "two adapters given" in err


@pytest.mark.parametrize(("argv", "hint"), [
    (["bench", "--config", "x.yaml", "--smok"], "did you mean --smoke?"),
    (["audit", "DIR", "--top-wastefull", "3"], "did you mean --top-wasteful?"),
    (["audit", "DIR", "--top_wasteful", "3"], "did you mean --top-wasteful?"),
    (["compress", "DIR", "--rnak", "2"], "did you mean --rank?"),
])
def test_unknown_flag_gets_did_you_mean_and_the_command_prefix(capsys: pytest.CaptureFixture[str],
                                                               argv: list[str], hint: str) -> None:
    rc, out, err = cli(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith(f"gradience {argv[0]}: error: unrecognized arguments: ") and hint in err
    assert err.count("\n") == 1


def test_usage_errors_stay_one_line_with_hostile_argv(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(capsys, "audit", "DIR", "--x\nfake line\x1b[31m")
    assert rc == 2 and out == "" and err.count("\n") == 1 and "\x1b" not in err
    assert err.startswith("gradience audit: error: unrecognized arguments: --x\\nfake line")
    rc, _, err = cli(capsys, "--debug", "audit", "DIR")
    assert rc == 2 and "--debug goes after the command name" in err


def test_abbreviations_are_off_on_every_parser(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    parser = build_parser()
    assert parser.allow_abbrev is False
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == set(COMMAND_MODULES)
    for name, subparser in sub.choices.items():
        assert subparser.allow_abbrev is False, name
    rc, _, err = cli(capsys, "audit", "DIR", "--top-wa", "3")  # a prefix of --top-wasteful is not accepted
    assert rc == 2 and "unrecognized arguments" in err


def test_a_named_command_builds_only_its_own_parser() -> None:
    code = ("import sys; from gradience.cli.main import build_parser, _chosen_command; "
            "build_parser(_chosen_command(['audit', 'x', '--json'])); "
            "print(sorted(m for m in sys.modules if m.startswith('gradience.cli.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "['gradience.cli.audit', 'gradience.cli.main']"


# Commands whose --help ends with their examples (bench's ends with its exit codes: cli/bench.py is not this area's).
ENDS_WITH_EXAMPLES = [c for c in COMMAND_MODULES if c not in ("bench", "merge", "verify", "export")]


@pytest.mark.parametrize("command", ENDS_WITH_EXAMPLES)
def test_help_ends_with_examples(command: str) -> None:
    import argparse

    parser = build_parser(command)
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    text = sub.choices[command].format_help().rstrip()
    last = text.split("\n\n")[-1]
    assert last.startswith("examples:") and f"gradience {command}" in last, text[-400:]


def test_top_level_help_lists_every_command_and_ends_with_examples() -> None:
    text = build_parser().format_help()
    for name in COMMAND_MODULES:
        assert name in text
    assert text.rstrip().split("\n\n")[-1].startswith("examples:")


# --- item 1: install hints name this project -------------------------------------------------------------------

def test_missing_extra_hint_installs_this_checkout() -> None:
    message = str(MissingDependencyError("torch", "hf", "the toy run"))
    assert 'pip install -e ".[hf]"' in message and "checkout" in message
    assert "pip install 'gradience[" not in message and "pip install gradience" not in message
    offenders = []
    for path in (REPO / "src" / "gradience").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for bad in ("pip install gradience", "pip install 'gradience", 'pip install "gradience'):
            if bad in text:
                offenders.append(f"{path.relative_to(REPO)}: {bad}")
    assert not offenders


# --- item 3: demo rerun starts a fresh log ------------------------------------------------------------------------

def test_demo_rerun_starts_a_fresh_run_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gradience.cli.demo import _fresh_run_log

    out = tmp_path / "demo"
    out.mkdir()
    _fresh_run_log(str(out))  # a first run: nothing to move, nothing said
    assert capsys.readouterr().err == "" and not (out / "run.jsonl.prev").exists()
    (out / "run.jsonl").write_text('{"event": "run_start"}\n')
    _fresh_run_log(str(out))
    err = capsys.readouterr().err
    assert not (out / "run.jsonl").exists()
    assert (out / "run.jsonl.prev").read_text() == '{"event": "run_start"}\n'
    assert "fresh run.jsonl" in err and "run.jsonl.prev" in err

"""The pretrained built-in toy model (issue 18 item 4): shipped weights, their provenance and use, and the audit's
random-init detection next to UDR."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from tests.support.synthetic import write_safetensors, write_synthetic_adapter

from gradience.cli.main import main
from gradience.policy.thresholds import UDR_RANDOM_INIT_EDGE_RATIO
from gradience.toy import pretrain
from gradience.udr.init_scale import CODE, edge_ratio, random_init_issue

DATA = resources.files("gradience.toy").joinpath("data")


# -- the random-init check (udr/init_scale.py) -----------------------------------------------------------------
@pytest.mark.parametrize(("m", "n"), [(64, 64), (256, 64), (1024, 1024)])
def test_edge_ratio_is_one_for_iid_matrices_of_any_scale(m: int, n: int) -> None:
    rng = np.random.default_rng(m + n)
    for std in (0.02, 1.0, 30.0):
        w = rng.normal(0.0, std, (m, n))
        s = np.linalg.svd(w, compute_uv=False)
        assert edge_ratio(float(s[0]), float(np.linalg.norm(w)), m, n) == pytest.approx(1.0, abs=0.08)


def test_edge_ratio_is_high_for_structured_matrices() -> None:
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    v, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    w = (u * (1.0 / np.arange(1, 65))) @ v.T + rng.normal(0, 0.002, (64, 64))   # a decaying spectrum
    s = np.linalg.svd(w, compute_uv=False)
    assert edge_ratio(float(s[0]), float(np.linalg.norm(w)), 64, 64) > 2 * UDR_RANDOM_INIT_EDGE_RATIO  # ≈ 3.1
    assert edge_ratio(0.0, 1.0, 4, 4) is None


def test_random_init_issue_needs_every_base_at_the_edge() -> None:
    at_edge = [("a", 16.0, 64.0, 64, 64), ("b", 16.5, 64.0, 64, 64)]   # ρ = 1.0, 1.03
    issue = random_init_issue(at_edge)
    assert issue is not None and issue.code == CODE and issue.modules == ["a", "b"]
    assert random_init_issue([*at_edge, ("c", 40.0, 64.0, 64, 64)]) is None   # one trained matrix: not random
    assert random_init_issue([]) is None


def _base(path: Path, weights: dict[str, np.ndarray]) -> Path:
    path.mkdir(parents=True)
    write_safetensors(path / "model.safetensors", weights)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


@pytest.mark.parametrize("trained", [False, True])
def test_audit_says_so_next_to_udr(tmp_path: Path, capsys: pytest.CaptureFixture[str], trained: bool) -> None:
    adapter = write_synthetic_adapter(tmp_path / "a", layers=1, targets={"q_proj": (64, 64), "k_proj": (64, 64)},
                                      r=4, alpha=8)
    rng = np.random.default_rng(1)
    weights = {}
    for name in ("q_proj", "k_proj"):
        w = rng.normal(0.0, 0.02, (64, 64))
        if trained:
            w += 0.5 * np.outer(rng.standard_normal(64), rng.standard_normal(64)) / 64   # a dominant direction
        weights[f"model.layers.0.self_attn.{name}.weight"] = w.astype(np.float32)
    base = _base(tmp_path / "base", weights)
    assert main(["audit", "--peft-dir", str(adapter), "--base-model", str(base), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    codes = [i["code"] for i in doc.get("issues", [])]
    assert (CODE in codes) is (not trained)
    main(["audit", "--peft-dir", str(adapter), "--base-model", str(base)])
    text = capsys.readouterr().out
    udr_block = text[text.index("UDR (update vs base"):]
    assert ("looks random-initialised" in udr_block.split("\n\n")[0]) is (not trained)


# -- the shipped pretrained body -------------------------------------------------------------------------------
def test_shipped_files_are_small_and_say_how_they_were_made() -> None:
    from safetensors import safe_open

    assert pretrain.shipped_files_present()
    sizes = [DATA.joinpath(n).stat().st_size if hasattr(DATA.joinpath(n), "stat") else
             len(DATA.joinpath(n).read_bytes()) for n in (pretrain.WEIGHTS_FILE, pretrain.CONFIG_FILE,
                                                          pretrain.TOKENIZER_FILE)]
    assert sum(sizes) < 2 * 1024 * 1024
    with resources.as_file(DATA.joinpath(pretrain.WEIGHTS_FILE)) as path, safe_open(str(path), "np") as fh:
        meta = fh.metadata()
        keys = list(fh.keys())
    assert "scripts/pretrain_toy.py" in meta["made_by"] and meta["objective"].startswith("masked LM")
    assert meta["steps"] == str(pretrain.PRETRAIN_STEPS) and meta["seed"] == str(pretrain.PRETRAIN_SEED)
    assert not any(k.startswith(("vocab_", "classifier", "pre_classifier")) for k in keys)  # the body only
    config = json.loads(DATA.joinpath(pretrain.CONFIG_FILE).read_text())
    from gradience.toy.model import TINY_SHAPE

    assert {k: config[k] for k in TINY_SHAPE} == TINY_SHAPE


def test_corpus_is_deterministic_and_disjoint_from_the_shipped_data() -> None:
    from safetensors import safe_open

    from gradience.toy.dataset import load_builtin

    corpus = pretrain.pretraining_corpus()
    assert corpus == pretrain.pretraining_corpus() and len(set(corpus)) == len(corpus) == pretrain.CORPUS_SIZE
    data = load_builtin()
    assert not set(corpus) & (set(data.train_texts) | set(data.test_texts))
    import hashlib

    with resources.as_file(DATA.joinpath(pretrain.WEIGHTS_FILE)) as path, safe_open(str(path), "np") as fh:
        assert fh.metadata()["corpus_sha256"] == hashlib.sha256("\n".join(corpus).encode()).hexdigest()


def test_builtin_model_loads_the_pretrained_body_when_the_vocabulary_covers_the_data() -> None:
    pytest.importorskip("torch")
    from safetensors.numpy import load_file

    from gradience.toy.dataset import load_builtin
    from gradience.toy.model import BUILTIN_MODEL, load_model

    data = load_builtin()
    tokenizer = pretrain.load_pretrained_tokenizer()
    assert pretrain.vocabulary_coverage(tokenizer, data.train_texts + data.test_texts) == 1.0
    a = load_model(BUILTIN_MODEL, 2, data.train_texts, seed=1)
    b = load_model(BUILTIN_MODEL, 2, data.train_texts, seed=2)
    assert a.pretrained and b.pretrained
    with resources.as_file(DATA.joinpath(pretrain.WEIGHTS_FILE)) as path:
        shipped = load_file(str(path))
    body = {k: v.detach().numpy() for k, v in a.model.distilbert.state_dict().items() if k in shipped}
    assert body.keys() == shipped.keys()
    assert all(np.array_equal(body[k], shipped[k]) for k in shipped)
    # The head is new, initialised from the run's seed (as from_pretrained does for a new head).
    assert not np.array_equal(a.model.classifier.weight.detach().numpy(), b.model.classifier.weight.detach().numpy())
    # Data outside the vocabulary: the random-init model with a tokenizer of that data, as before.
    other = load_model(BUILTIN_MODEL, 2, ["zorblax quintessence flummox", "glorp snark"], seed=1)
    assert not other.pretrained and other.tokenizer.unk_token_id not in other.tokenizer("glorp snark")["input_ids"]


def test_pretrained_attention_weights_are_not_at_the_random_edge() -> None:
    from safetensors.numpy import load_file

    with resources.as_file(DATA.joinpath(pretrain.WEIGHTS_FILE)) as path:
        shipped = load_file(str(path))
    ratios = []
    for name, w in shipped.items():
        if name.endswith(("q_lin.weight", "k_lin.weight", "v_lin.weight", "out_lin.weight")):
            s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
            ratios.append(edge_ratio(float(s[0]), float(np.linalg.norm(w)), *w.shape))
    assert len(ratios) == 8
    assert max(r for r in ratios if r is not None) >= UDR_RANDOM_INIT_EDGE_RATIO


@pytest.mark.slow
def test_pretraining_is_reproducible(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    a = pretrain.pretrain(tmp_path / "a", steps=12, corpus_size=500)
    b = pretrain.pretrain(tmp_path / "b", steps=12, corpus_size=500)
    assert a["losses"] == b["losses"]
    for name in (pretrain.CONFIG_FILE, pretrain.TOKENIZER_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # safetensors writes its metadata map in no fixed order: compare what it holds, not the header bytes.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / pretrain.WEIGHTS_FILE), "np") as fa, \
            safe_open(str(tmp_path / "b" / pretrain.WEIGHTS_FILE), "np") as fb:
        names = sorted(fa.keys())
        assert fa.metadata() == fb.metadata() and names == sorted(fb.keys())
        assert all(np.array_equal(fa.get_tensor(k), fb.get_tensor(k)) for k in names)

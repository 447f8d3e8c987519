"""Test session setup: ``tests/`` on sys.path (for ``support``), offline Hugging Face, shared fixtures.

Model and adapter fixtures are session-scoped: each is built once, on first use, under the session's tmp dir
and shared by every test that asks for it. Tests must treat these directories as read-only (copy them with
``shutil.copytree`` before modifying anything).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Tiny LAPACK calls and σ₁ iterations run several times slower with multi-threaded BLAS on a busy 2-core
# machine; must be set before numpy is first imported (as the CLI does).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

for _var, _value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                     ("TOKENIZERS_PARALLELISM", "false")):
    os.environ[_var] = _value

from support import synthetic, tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def fixture_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory per session that holds every built model and adapter."""
    return tmp_path_factory.mktemp("gradience_fixtures")


# -- tiny base models ----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_llama_dir(fixture_root: Path) -> Path:
    return tiny_models.make_tiny_llama(fixture_root / "tiny_llama")


@pytest.fixture(scope="session")
def tiny_llama_bf16_dir(fixture_root: Path) -> Path:
    return tiny_models.make_tiny_llama(fixture_root / "tiny_llama_bf16", dtype="bfloat16")


@pytest.fixture(scope="session")
def tiny_llama_sharded_dir(fixture_root: Path) -> Path:
    """Tiny Llama saved in several shards with a ``model.safetensors.index.json``."""
    return tiny_models.make_tiny_llama(fixture_root / "tiny_llama_sharded", max_shard_size="20KB")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(fixture_root: Path) -> Path:
    return tiny_models.make_tiny_gpt2(fixture_root / "tiny_gpt2")


@pytest.fixture(scope="session")
def tiny_distilbert_dir(fixture_root: Path) -> Path:
    return tiny_models.make_tiny_distilbert(fixture_root / "tiny_distilbert")


@pytest.fixture(scope="session")
def tiny_distilbert_seqcls_dir(fixture_root: Path) -> Path:
    return tiny_models.make_tiny_distilbert(fixture_root / "tiny_distilbert_seqcls", seq_cls=True)


# -- real PEFT adapters --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def llama_adapter_dir(fixture_root: Path, tiny_llama_dir: Path) -> Path:
    """r=8, alpha=16, all 7 Llama targets, both factors random (non-zero)."""
    return tiny_models.make_peft_adapter(tiny_llama_dir, fixture_root / "llama_lora", arch="llama")


@pytest.fixture(scope="session")
def llama_adapter_zero_dir(fixture_root: Path, tiny_llama_dir: Path) -> Path:
    """PEFT default init (B = 0): an adapter saved before training."""
    return tiny_models.make_peft_adapter(tiny_llama_dir, fixture_root / "llama_lora_zero", arch="llama",
                                         init="zero")


@pytest.fixture(scope="session")
def llama_adapter_trained_dir(fixture_root: Path, tiny_llama_dir: Path) -> Path:
    """A few optimizer steps from PEFT's default init."""
    return tiny_models.make_peft_adapter(tiny_llama_dir, fixture_root / "llama_lora_trained", arch="llama",
                                         init="trained")


@pytest.fixture(scope="session")
def llama_adapter_bf16_dir(fixture_root: Path, tiny_llama_dir: Path) -> Path:
    """Random factors saved as BF16."""
    return tiny_models.make_peft_adapter(tiny_llama_dir, fixture_root / "llama_lora_bf16", arch="llama",
                                         dtype="bfloat16")


@pytest.fixture(scope="session")
def llama_adapter_patterns_dir(fixture_root: Path, tiny_llama_dir: Path) -> Path:
    """rsLoRA with rank_pattern {q_proj: 4, layers.1.mlp.down_proj: 2} and alpha_pattern {v_proj: 4}."""
    return tiny_models.make_peft_adapter(
        tiny_llama_dir, fixture_root / "llama_lora_patterns", arch="llama", use_rslora=True,
        rank_pattern={"q_proj": 4, "model.layers.1.mlp.down_proj": 2}, alpha_pattern={"v_proj": 4})


@pytest.fixture(scope="session")
def llama_adapter_dora_dir(fixture_root: Path, tiny_llama_dir: Path) -> Path:
    return tiny_models.make_peft_adapter(tiny_llama_dir, fixture_root / "llama_dora", arch="llama", use_dora=True)


@pytest.fixture(scope="session")
def gpt2_adapter_dir(fixture_root: Path, tiny_gpt2_dir: Path) -> Path:
    """Targets c_attn, c_proj (attn and mlp), c_fc; fan_in_fan_out=True as GPT-2 requires."""
    return tiny_models.make_peft_adapter(tiny_gpt2_dir, fixture_root / "gpt2_lora", arch="gpt2")


@pytest.fixture(scope="session")
def distilbert_adapter_dir(fixture_root: Path, tiny_distilbert_dir: Path) -> Path:
    return tiny_models.make_peft_adapter(tiny_distilbert_dir, fixture_root / "distilbert_lora", arch="distilbert")


@pytest.fixture(scope="session")
def distilbert_seqcls_adapter_dir(fixture_root: Path, tiny_distilbert_seqcls_dir: Path) -> Path:
    """SEQ_CLS task: PEFT adds the classifier heads as modules_to_save (non-LoRA tensors in the file)."""
    return tiny_models.make_peft_adapter(tiny_distilbert_seqcls_dir, fixture_root / "distilbert_seqcls_lora",
                                         arch="distilbert", task_type="SEQ_CLS")


@pytest.fixture(scope="session")
def multi_adapter_dir(fixture_root: Path, tiny_llama_dir: Path) -> Path:
    """PEFT multi-adapter layout: "default" (r=8) at the root, "second" (r=4) in ``second/``."""
    return tiny_models.make_multi_adapter_dir(tiny_llama_dir, fixture_root / "multi_adapter")


@pytest.fixture(scope="session")
def hf_cache_snapshot(fixture_root: Path, tiny_llama_dir: Path) -> Path:
    """Tiny Llama in a hub-cache layout under ``fixture_root/hf_cache`` as repo ``org/tiny-llama``."""
    return tiny_models.make_hf_cache_layout(tiny_llama_dir, fixture_root / "hf_cache")


# -- numpy-only synthetic adapters ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def synthetic_adapter_dir(fixture_root: Path) -> Path:
    """4 layers × q/k/v/o/gate/up/down with hidden 64, intermediate 128, r=8, alpha=16, fp32 (no torch)."""
    return synthetic.write_synthetic_adapter(fixture_root / "synthetic_f32", layers=4,
                                             targets=synthetic.llama_targets(64, 128), r=8, alpha=16)


@pytest.fixture(scope="session")
def synthetic_bf16_adapter_dir(fixture_root: Path) -> Path:
    """Same shapes and seed as ``synthetic_adapter_dir`` but stored as BF16."""
    return synthetic.write_synthetic_adapter(fixture_root / "synthetic_bf16", layers=4,
                                             targets=synthetic.llama_targets(64, 128), r=8, alpha=16, dtype="BF16")

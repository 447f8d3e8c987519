"""The toy run's model and tokenizer: a tiny DistilBERT-shaped classifier built locally — its body pretrained
(masked LM on generated review sentences, weights shipped as package data: :mod:`gradience.toy.pretrain`) when
the data's words are in its vocabulary, else random-init with a word-level tokenizer trained on the data — or
a real checkpoint (hub id or local path) loaded with the ordinary ``AutoTokenizer`` /
``AutoModelForSequenceClassification`` code paths.

Imports torch/transformers lazily so ``gradience.toy`` itself stays importable without the ``hf`` extra.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gradience.errors import InputError, MissingDependencyError

BUILTIN_MODEL = "gradience/tiny-distilbert"
# LoRA targets for the built-in model: every attention projection, so the audit has 4 modules per block.
BUILTIN_TARGETS = ("q_lin", "k_lin", "v_lin", "out_lin")
# The classification head of the built-in model is new at every run (both layers): trained in full.
BUILTIN_HEAD_MODULES = ("pre_classifier", "classifier")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_LENGTH = 32

# Shape of the built-in model: small enough to train ~100 steps on 2 CPU cores in seconds.
TINY_SHAPE: dict[str, Any] = {"dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 128}
# The pretrained body is used when at least this fraction of the data's words is in its vocabulary.
PRETRAINED_MIN_COVERAGE = 0.99


def require_hf(purpose: str) -> None:
    """Fail with one clear message naming the ``hf`` extra when torch / transformers / peft are missing."""
    for package in ("torch", "transformers", "peft"):
        try:
            __import__(package)
        except ImportError as exc:
            raise MissingDependencyError(package, "hf", purpose) from exc


def build_word_tokenizer(texts: Sequence[str]) -> Any:
    """A lower-casing word-level tokenizer (``[CLS] ... [SEP]``) trained on ``texts``, as a transformers
    fast tokenizer so it saves/loads like any hub tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    core.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(list(texts), trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS)))
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[(tok, core.token_to_id(tok)) for tok in ("[CLS]", "[SEP]")],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=MAX_LENGTH,
    )


def build_tiny_classifier(vocab_size: int, num_labels: int, seed: int) -> Any:
    """A randomly initialised 2-block DistilBERT classifier (deterministic for a given seed)."""
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(  # type: ignore[call-arg]  # num_labels etc. go through **kwargs
        vocab_size=vocab_size, max_position_embeddings=MAX_LENGTH, num_labels=num_labels,
        dropout=0.0, attention_dropout=0.0, pad_token_id=0, **TINY_SHAPE,
    )
    # Named so the saved adapter_config.json says which base it belongs to (`gradience check` shows it).
    config.name_or_path = BUILTIN_MODEL
    torch.manual_seed(seed)
    model = DistilBertForSequenceClassification(config)
    model.name_or_path = BUILTIN_MODEL
    return model


def hub_load_kwargs(spec: str, flag: str = "--model") -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for a model spec, decided before transformers is asked: {} for a local
    directory or a reachable hub; ``local_files_only`` for a hub id that is cached while the hub is not
    reachable (transformers would retry for a minute); InputError at once for one neither cached nor reachable,
    saying how to proceed (``save_pretrained`` it and pass the directory)."""
    if os.path.isdir(os.path.expanduser(spec)):
        return {}
    from gradience.io.hub import force_offline, require_hub_id_available

    if require_hub_id_available(spec.partition("@")[0], repo_type="model", flag=flag, spec=spec):
        force_offline()
        return {"local_files_only": True}
    return {}


def build_builtin_classifier(train_texts: Sequence[str], num_labels: int, seed: int) -> tuple[Any, Any, bool]:
    """(tokenizer, model, pretrained) for the built-in model: the shipped pretrained body (head from ``seed``)
    when its vocabulary covers ``train_texts``, else the random-init model with a tokenizer of the texts."""
    from gradience.toy import pretrain

    if pretrain.shipped_files_present():
        tokenizer = pretrain.load_pretrained_tokenizer()
        if pretrain.vocabulary_coverage(tokenizer, train_texts) >= PRETRAINED_MIN_COVERAGE:
            tokenizer, model = pretrain.load_pretrained_classifier(num_labels, seed)
            return tokenizer, model, True
    tokenizer = build_word_tokenizer(train_texts)
    return tokenizer, build_tiny_classifier(len(tokenizer), num_labels, seed), False


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    default_targets: list[str] | None  # None: let PEFT choose for this architecture
    pretrained: bool = True            # False: the built-in model at random init (data outside its vocabulary)
    # New (untrained) head layers LoRA must train in full; None: PEFT's task default (``classifier``/``score``),
    # which leaves DistilBERT's new pre_classifier frozen at its random init.
    head_modules: list[str] | None = None


def load_model(spec: str, num_labels: int, train_texts: Sequence[str], seed: int) -> LoadedModel:
    """The built-in tiny model (``spec == BUILTIN_MODEL``) or a checkpoint from the hub / a local directory.

    Never trusts remote code. A checkpoint that cannot be loaded (offline and not cached, missing files)
    is one ``InputError`` naming it.
    """
    require_hf("the toy run")
    if spec == BUILTIN_MODEL:
        tokenizer, model, pretrained = build_builtin_classifier(train_texts, num_labels, seed)
        return LoadedModel(model, tokenizer, BUILTIN_MODEL, list(BUILTIN_TARGETS), pretrained,
                           list(BUILTIN_HEAD_MODULES))
    if spec.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(spec)):
        raise InputError("model directory does not exist", path=spec)
    path = os.path.expanduser(spec)
    hub = hub_load_kwargs(spec)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, **hub)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, trust_remote_code=False, ignore_mismatched_sizes=True, **hub)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (offline and not in the local cache?)" if offline or not os.path.isdir(path) else ""
        raise InputError(f"cannot load model{hint}: {type(exc).__name__}: {exc}"[:500], path=spec) from exc
    if tokenizer.pad_token is None:
        # GPT-style tokenizers have no pad token; padding with EOS is the usual choice for classification.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, tokenizer, spec, None)

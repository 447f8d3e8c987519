"""Pretraining of the built-in tiny model, so the toy run adapts a base that knows its language (issue 18 item 4).

A LoRA fine-tune of a random-init base is not a LoRA fine-tune as users run them: the update dwarfs the base
(UDR medians of 4-14) and results swing with the seed. So the tiny DistilBERT is pretrained once, by masked
language modelling on generated movie-review sentences (the toy data's generator, with a different seed and
every sentence of the shipped data excluded) plus a label-free sentence objective — the [CLS] output predicts
which words the sentence holds (bag of words), so that [CLS], which MLM never trains, summarises the sentence
as a classification head expects — and its weights ship as package data:

- ``toy/data/tiny_distilbert.safetensors``: the DistilBERT body (embeddings + transformer blocks), float32,
  with ``__metadata__`` naming this module, the seed, the steps and a hash of the corpus;
- ``toy/data/tiny_distilbert_config.json``: its ``DistilBertConfig``;
- ``toy/data/tiny_distilbert_tokenizer.json``: the word-level tokenizer (vocabulary of the corpus).

Made by ``python scripts/pretrain_toy.py`` (one CPU thread: the same tensors for a given torch build). The
classification head is not pretrained: the toy run initialises it from its seed, as ``from_pretrained`` does
for a new head.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from gradience.toy.dataset import generate_tiny_sentiment, load_builtin

WEIGHTS_FILE = "tiny_distilbert.safetensors"
CONFIG_FILE = "tiny_distilbert_config.json"
TOKENIZER_FILE = "tiny_distilbert_tokenizer.json"
CORPUS_SEED = 2026          # the shipped data uses seed 0; shipped sentences are excluded anyway
CORPUS_SIZE = 20_000
PRETRAIN_SEED = 0
PRETRAIN_STEPS = 1200
PRETRAIN_BATCH = 64
PRETRAIN_LR = 1e-3
MASK_PROB = 0.15
BOW_WEIGHT = 10.0           # the bag-of-words BCE is per vocabulary entry (~1/100 the scale of the MLM loss)
N_SPECIAL = 5               # the word tokenizer's special tokens take ids 0-4 (gradience.toy.model.SPECIAL_TOKENS)


def pretraining_corpus(size: int = CORPUS_SIZE, seed: int = CORPUS_SEED) -> list[str]:
    """Distinct generated sentences, none of them in the shipped train or test split."""
    data = load_builtin()
    shipped = set(data.train_texts) | set(data.test_texts)
    rows = generate_tiny_sentiment(seed=seed, train_size=size + len(shipped), test_size=0)
    return [row["text"] for row in rows if row["text"] not in shipped][:size]


def _data_dir() -> Any:
    return resources.files("gradience.toy").joinpath("data")


def shipped_files_present() -> bool:
    """Whether the pretrained weights, config and tokenizer ship with this install."""
    d = _data_dir()
    return all(d.joinpath(name).is_file() for name in (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE))


def load_pretrained_tokenizer() -> Any:
    """The shipped word-level tokenizer as a transformers fast tokenizer."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from gradience.toy.model import MAX_LENGTH

    core = Tokenizer.from_str(_data_dir().joinpath(TOKENIZER_FILE).read_text(encoding="utf-8"))
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=MAX_LENGTH)


def vocabulary_coverage(tokenizer: Any, texts: Sequence[str]) -> float:
    """Fraction of the words of ``texts`` the tokenizer knows (1.0 for the built-in data)."""
    unk = tokenizer.unk_token_id
    total = known = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        total += len(ids)
        known += sum(1 for i in ids if i != unk)
    return known / total if total else 0.0


def load_pretrained_classifier(num_labels: int, seed: int) -> tuple[Any, Any]:
    """(tokenizer, DistilBertForSequenceClassification) with the shipped pretrained body and a head initialised
    from ``seed``."""
    import torch
    from safetensors.torch import load_file
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from gradience.toy.model import BUILTIN_MODEL

    config_dict = json.loads(_data_dir().joinpath(CONFIG_FILE).read_text(encoding="utf-8"))
    config = DistilBertConfig(**{**config_dict, "num_labels": num_labels})
    config.name_or_path = BUILTIN_MODEL
    torch.manual_seed(seed)
    model = DistilBertForSequenceClassification(config)
    with resources.as_file(_data_dir().joinpath(WEIGHTS_FILE)) as path:
        state = load_file(str(path))
    missing, unexpected = model.distilbert.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise RuntimeError(f"shipped toy weights do not fit the model: missing {missing}, unexpected {unexpected}")
    model.name_or_path = BUILTIN_MODEL
    return load_pretrained_tokenizer(), model


def _mask(input_ids: Any, special: Any, mask_id: int, vocab: int, gen: Any) -> tuple[Any, Any]:
    """BERT masking: 15% of real tokens are targets; of those 80% -> [MASK], 10% random, 10% kept."""
    import torch

    labels = input_ids.clone()
    prob = torch.full(input_ids.shape, MASK_PROB)
    prob[special] = 0.0
    chosen = torch.bernoulli(prob, generator=gen).bool()
    labels[~chosen] = -100
    inputs = input_ids.clone()
    replace = torch.bernoulli(torch.full(input_ids.shape, 0.8), generator=gen).bool() & chosen
    inputs[replace] = mask_id
    randomize = torch.bernoulli(torch.full(input_ids.shape, 0.5), generator=gen).bool() & chosen & ~replace
    inputs[randomize] = torch.randint(vocab, input_ids.shape, generator=gen)[randomize]
    return inputs, labels


def pretrain(out_dir: str | Path, *, steps: int = PRETRAIN_STEPS, corpus_size: int = CORPUS_SIZE,
             seed: int = PRETRAIN_SEED, log_every: int = 100, progress: bool = False) -> dict[str, Any]:
    """Pretrain the tiny DistilBERT by MLM and write the three package-data files into ``out_dir``.
    Returns a summary (losses, seconds, sizes)."""
    import torch

    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # one thread: the same tensors on every machine with this torch build
    try:
        return _pretrain(out_dir, steps=steps, corpus_size=corpus_size, seed=seed, log_every=log_every,
                         started=started, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain(out_dir: str | Path, *, steps: int, corpus_size: int, seed: int, log_every: int,
              started: float, progress: bool) -> dict[str, Any]:
    import torch
    from safetensors.torch import save
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    from gradience.jsonio import atomic_write_bytes, atomic_write_text
    from gradience.toy.model import MAX_LENGTH, TINY_SHAPE, build_word_tokenizer

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    corpus = pretraining_corpus(corpus_size)
    corpus_sha = hashlib.sha256("\n".join(corpus).encode()).hexdigest()
    tokenizer = build_word_tokenizer(corpus)
    config = DistilBertConfig(vocab_size=len(tokenizer), max_position_embeddings=MAX_LENGTH, pad_token_id=0,
                              dropout=0.0, attention_dropout=0.0, **TINY_SHAPE)
    model = DistilBertForMaskedLM(config)
    bow_head = torch.nn.Linear(config.dim, config.vocab_size)   # [CLS] -> words of the sentence (not shipped)
    enc = tokenizer(corpus, truncation=True, max_length=MAX_LENGTH, padding="max_length", return_tensors="pt",
                    return_special_tokens_mask=True)
    ids, attn = enc["input_ids"], enc["attention_mask"]
    special = enc["special_tokens_mask"].bool() | (attn == 0)
    params = [*model.parameters(), *bow_head.parameters()]
    opt = torch.optim.AdamW(params, lr=PRETRAIN_LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / (steps // 10 + 1)) * max(0.0, 1.0 - s / steps))
    losses: list[float] = []
    model.train()
    for step in range(steps):
        idx = torch.randint(len(corpus), (PRETRAIN_BATCH,), generator=gen)
        width = int(attn[idx].sum(dim=1).max())   # pad to the batch's longest sentence, not to MAX_LENGTH
        inputs, labels = _mask(ids[idx, :width], special[idx, :width], tokenizer.mask_token_id, len(tokenizer), gen)
        out = model(input_ids=inputs, attention_mask=attn[idx, :width], labels=labels, output_hidden_states=True)
        words = torch.zeros(len(idx), config.vocab_size)
        words.scatter_(1, ids[idx, :width], 1.0)
        words[:, :N_SPECIAL] = 0.0   # [PAD] [UNK] [CLS] [SEP] [MASK] are not words of the sentence
        bow = torch.nn.functional.binary_cross_entropy_with_logits(bow_head(out.hidden_states[-1][:, 0]), words)
        loss = out.loss + BOW_WEIGHT * bow
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            losses.append(round(float(loss.detach()), 4))
            if progress:
                print(f"step {step + 1}/{steps}  loss (MLM + bag of words) {losses[-1]:.4f}", flush=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    body = {k: v.detach().contiguous() for k, v in model.distilbert.state_dict().items()
            if not k.endswith("position_ids")}
    meta = {"made_by": "gradience.toy.pretrain (python scripts/pretrain_toy.py)",
            "objective": "masked LM + [CLS] bag of words",
            "seed": str(seed), "steps": str(steps), "batch": str(PRETRAIN_BATCH), "lr": str(PRETRAIN_LR),
            "corpus": f"{len(corpus)} generated sentences, seed {CORPUS_SEED}, shipped data excluded",
            "corpus_sha256": corpus_sha, "torch": torch.__version__}
    atomic_write_bytes(out / WEIGHTS_FILE, save(body, metadata=meta))
    keep = ("vocab_size", "max_position_embeddings", "dim", "n_layers", "n_heads", "hidden_dim", "dropout",
            "attention_dropout", "pad_token_id", "activation", "initializer_range", "sinusoidal_pos_embds")
    cfg = {k: v for k, v in config.to_dict().items() if k in keep}
    atomic_write_text(out / CONFIG_FILE, json.dumps(cfg, indent=1, sort_keys=True) + "\n")
    atomic_write_text(out / TOKENIZER_FILE, tokenizer.backend_tokenizer.to_str() + "\n")
    return {"losses": losses, "seconds": time.perf_counter() - started, "corpus": len(corpus),
            "vocab": len(tokenizer), "params": sum(v.numel() for v in body.values()),
            "bytes": (out / WEIGHTS_FILE).stat().st_size}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pretrain the built-in tiny model (masked LM) and write its "
                                                 "package-data files.")
    parser.add_argument("--out", default=str(Path(__file__).parent / "data"), help="output directory")
    parser.add_argument("--steps", type=int, default=PRETRAIN_STEPS)
    parser.add_argument("--corpus-size", type=int, default=CORPUS_SIZE)
    parser.add_argument("--seed", type=int, default=PRETRAIN_SEED)
    args = parser.parse_args(argv)
    summary = pretrain(args.out, steps=args.steps, corpus_size=args.corpus_size, seed=args.seed, progress=True)
    print(json.dumps(summary, indent=1))
    return 0

"""A causal-LM toy for the bench: a tiny Llama-shaped model built from a config and generated story text.

Offline and deterministic: ``gradience/tiny-llama`` is a randomly initialised 2-block LlamaForCausalLM with a
word-level tokenizer trained on the text; ``gradience/tiny-stories`` is generated here (no file, no hub).
Each text is a little word problem ("mia has three apples . mia buys two more . now mia has five apples ."),
so a LoRA on attention lowers the eval loss quickly, and the last number is an exact-match answer
(prompt: the text up to "now NAME has", answer: the number word).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

BUILTIN_CAUSAL_MODEL = "gradience/tiny-llama"
BUILTIN_CAUSAL_DATASET = "gradience/tiny-stories"
BUILTIN_CAUSAL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
CAUSAL_MAX_LENGTH = 32

_NAMES = ("mia", "tom", "ava", "leo", "zoe", "max", "ivy", "sam", "eva", "ben", "amy", "dan")
_ITEMS = ("apples", "books", "coins", "cards", "shells", "pens", "stones", "cups")
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_VERBS = ("buys", "finds", "gets", "wins")


@dataclass
class StoryData:
    """Train texts, and eval prompts with their full texts and answers (same items for every arm)."""

    name: str
    train_texts: list[str]
    eval_texts: list[str]
    eval_prompts: list[str]
    eval_answers: list[str]


def _story(rng: random.Random) -> tuple[str, str, str]:
    name, item, verb = rng.choice(_NAMES), rng.choice(_ITEMS), rng.choice(_VERBS)
    n = rng.randrange(0, 6)
    m = rng.randrange(0, 11 - n)
    prompt = f"{name} has {_NUMBERS[n]} {item} . {name} {verb} {_NUMBERS[m]} more . now {name} has"
    answer = _NUMBERS[n + m]
    return f"{prompt} {answer} {item} .", prompt, answer


def generate_tiny_stories(seed: int = 0, train_size: int = 1200, eval_size: int = 200) -> StoryData:
    """The built-in causal-LM data; the seed fixes the split, so every bench arm sees the same items."""
    rng = random.Random(seed)
    train = [_story(rng)[0] for _ in range(train_size)]
    evals = [_story(rng) for _ in range(eval_size)]
    return StoryData(BUILTIN_CAUSAL_DATASET, train, [e[0] for e in evals], [e[1] for e in evals],
                     [e[2] for e in evals])


def build_tiny_causal_lm(vocab_size: int, seed: int, pad_token_id: int) -> object:
    """A randomly initialised 2-block Llama (hidden 64), deterministic for a given seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CAUSAL_MAX_LENGTH * 2,
                         tie_word_embeddings=False, pad_token_id=pad_token_id)
    config.name_or_path = BUILTIN_CAUSAL_MODEL
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.name_or_path = BUILTIN_CAUSAL_MODEL
    return model

"""Task-profile inference from a dataset or task name (SPEC §7).

The profile steers ``check`` advice (a reasoning fine-tune wants a lower lr than a sentiment classifier),
so an inferred profile is always shown as inferred. Matching is by name token, not raw substring, so that
``glue/sst2`` is classification but ``assistant`` does not match ``sst``: a keyword matches a token that
starts with it (``summar`` -> ``summarization``, ``sst`` -> ``sst2``) or, for keywords of four or more
letters, ends with it (``ultrachat``). Keywords containing ``_`` match consecutive tokens (``ag_news``).
"""

from __future__ import annotations

import re

# Checked in this order: a reasoning set phrased as instructions (``gsm8k_instruct``) is still reasoning.
PROFILE_KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("hard_reasoning", (
        "gsm8k", "gsm", "svamp", "math", "aqua", "asdiv", "multiarith", "proof", "reason", "mawps",
    )),
    ("easy_classification", (
        "sst", "sst2", "mnli", "qqp", "qnli", "rte", "cola", "mrpc", "wnli", "sentiment", "classification",
        "classif", "imdb", "ag_news", "yelp", "rotten_tomatoes", "emotion", "tweet_eval",
    )),
    ("generation", (
        "alpaca", "dolly", "chat", "instruct", "summar", "xsum", "samsum", "dialog", "oasst", "sharegpt",
        "wikitext", "generation",
    )),
)
_MIN_SUFFIX_MATCH = 4


def _tokens(name: str) -> list[str]:
    return [t for t in re.split(r"[^a-z0-9]+", name.lower()) if t]


def _matches(keyword: str, tokens: list[str]) -> bool:
    parts = keyword.split("_")
    if len(parts) > 1:
        n = len(parts)
        return any(tokens[i:i + n] == parts for i in range(len(tokens) - n + 1))
    return any(t.startswith(keyword) or (len(keyword) >= _MIN_SUFFIX_MATCH and t.endswith(keyword))
               for t in tokens)


def profile_for_name(name: str | None) -> str | None:
    """The profile whose keywords match ``name``, or None."""
    if not name:
        return None
    tokens = _tokens(name)
    for profile, keywords in PROFILE_KEYWORDS:
        if any(_matches(k, tokens) for k in keywords):
            return profile
    return None


def infer_task_profile(dataset_name: str | None, task: str | None = None) -> str | None:
    """Profile inferred from the dataset name, else from the task name; None when neither says."""
    return profile_for_name(dataset_name) or profile_for_name(task)

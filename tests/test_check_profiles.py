"""Task-profile inference from dataset / task names (SPEC §7 keyword lists)."""

from __future__ import annotations

import pytest

from gradience.policy.profiles import infer_task_profile


@pytest.mark.parametrize("name", ["gsm8k", "openai/gsm8k", "ChilleD/SVAMP", "competition_math", "aqua_rat",
                                  "asdiv", "MultiArith", "proofwriter", "reasoning-set", "hendrycks/MATH"])
def test_hard_reasoning(name: str) -> None:
    assert infer_task_profile(name) == "hard_reasoning"


@pytest.mark.parametrize("name", ["sst2", "glue/sst2", "SST-2", "mnli", "glue/qqp", "qnli", "super_glue/rte",
                                  "cola", "mrpc", "my-sentiment-data", "text_classification", "imdb",
                                  "ag_news", "fancyzhx/ag_news", "gradience/tiny-sentiment"])
def test_easy_classification(name: str) -> None:
    assert infer_task_profile(name) == "easy_classification"


@pytest.mark.parametrize("name", ["tatsu-lab/alpaca", "alpaca_cleaned", "databricks/databricks-dolly-15k",
                                  "HuggingFaceH4/ultrachat_200k", "chat-logs", "instruction-tuning",
                                  "summarization_set", "xsum"])
def test_generation(name: str) -> None:
    assert infer_task_profile(name) == "generation"


@pytest.mark.parametrize("name", [None, "", "my-data", "assistant", "sstable", "news", "c4"])
def test_no_profile(name: str | None) -> None:
    # token matching: "assistant" contains "sst" and "news" is only half of "ag_news", neither matches
    expected = "easy_classification" if name == "sstable" else None
    assert infer_task_profile(name) == expected


def test_reasoning_wins_over_generation_wording() -> None:
    assert infer_task_profile("gsm8k_instruct") == "hard_reasoning"


def test_task_is_the_fallback_hint() -> None:
    assert infer_task_profile("my-data", "sentiment") == "easy_classification"
    assert infer_task_profile("gsm8k", "sentiment") == "hard_reasoning"
    assert infer_task_profile(None, None) is None

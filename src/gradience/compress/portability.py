"""Will the compressed adapter load *correctly* in PEFT, vLLM and llama.cpp? (thin re-export)

The rules live in the one engine table, :mod:`gradience.engines` (shared with merge, verify and export); this
module keeps the names compress has always used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gradience.engines import OutputFacts, evaluate


def portability(facts: OutputFacts, engine_versions: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """{engine: {ok, reason, rules, version}} for ``peft``, ``vllm`` and ``llama_cpp`` (see
    :func:`gradience.engines.evaluate`)."""
    return evaluate(facts, engine_versions)


__all__ = ["OutputFacts", "portability"]

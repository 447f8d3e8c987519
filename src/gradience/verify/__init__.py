"""``gradience verify`` (issue 20): prove what a merge or an engine actually applied.

* :func:`verify_merged`: a merged checkpoint against its base and adapter, module by module (streamed).
* :func:`verify_mapping`: every LoRA pair resolves to a base weight under PEFT's, vLLM's or llama.cpp's naming.
* :func:`verify_gguf`: a llama.cpp LoRA GGUF computes PEFT's ΔW (needs the ``gguf`` extra).

All return a ``gradience.verify/v1`` document; none imports torch (only a ``.bin`` checkpoint would).
"""

from __future__ import annotations

from typing import Any

SCHEMA = "gradience.verify/v1"


def verify_merged(*args: Any, **kwargs: Any) -> dict[str, Any]:
    from gradience.verify.merged import verify_merged as run

    return run(*args, **kwargs)


def verify_mapping(*args: Any, **kwargs: Any) -> dict[str, Any]:
    from gradience.verify.mapping import verify_mapping as run

    return run(*args, **kwargs)


def verify_gguf(*args: Any, **kwargs: Any) -> dict[str, Any]:
    from gradience.verify.gguf_check import verify_gguf as run

    return run(*args, **kwargs)


__all__ = ["SCHEMA", "verify_gguf", "verify_mapping", "verify_merged"]

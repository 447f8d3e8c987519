"""``gradience export`` (issue 20): write an adapter for another engine; today a llama.cpp LoRA GGUF.

Needs the ``gguf`` extra (from the checkout: ``pip install -e ".[gguf]"``), imported only when an export runs.
"""

from __future__ import annotations

from typing import Any


def export_gguf(*args: Any, **kwargs: Any) -> dict[str, Any]:
    from gradience.export.gguf import export_gguf as run

    return run(*args, **kwargs)


__all__ = ["export_gguf"]

"""``gradience.vnext.integrations.hf``: the reference tool's import path for the Hugging Face callback.

``GradienceCallback`` is this project's callback. ``GradienceCallbackConfig`` is this project's config class,
also accepting the reference's Guard field names (``enable_guard``, ``guard_ring_size``,
``guard_window_steps``, …) as deprecated aliases, in the constructor and as attributes: one
``DeprecationWarning`` each, translated by :func:`gradience.integrations.guard.translate_reference_guard_fields`
(the one table of those names). Importing this module imports transformers (the ``hf`` extra).
"""

from __future__ import annotations

from typing import Any

from gradience.integrations.guard import (
    REFERENCE_GUARD_ALIASES,
    REFERENCE_GUARD_NO_EFFECT,
    translate_reference_guard_fields,
)
from gradience.integrations.hf import GradienceCallback
from gradience.integrations.hf import GradienceCallbackConfig as _Config


class GradienceCallbackConfig(_Config):
    """:class:`gradience.integrations.hf.GradienceCallbackConfig`, accepting the reference's Guard names."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **translate_reference_guard_fields(kwargs, stacklevel=3))

    def __getattr__(self, name: str) -> Any:  # reached only for names the dataclass does not have
        if name in REFERENCE_GUARD_ALIASES or name in REFERENCE_GUARD_NO_EFFECT:
            translate_reference_guard_fields({name: None}, stacklevel=3)  # the warning
            new = REFERENCE_GUARD_ALIASES.get(name)
            return None if new is None else getattr(self, new)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        for new, val in translate_reference_guard_fields({name: value}, stacklevel=3).items():
            super().__setattr__(new, val)


__all__ = ["GradienceCallback", "GradienceCallbackConfig"]

"""Gradience: a flight recorder and a mechanic for LoRA / PEFT fine-tuning.

The top-level package stays import-light (no numpy, no torch) so that ``import gradience``
is cheap; capabilities live in subpackages and are imported on demand.
"""

from gradience._version import __version__

__all__ = ["__version__"]

"""Shared test fixtures: tiny real models, real PEFT adapters, and numpy-only synthetic adapters.

``tiny_models`` needs torch/transformers/peft (imported inside each builder); ``synthetic`` needs only numpy
and is shared with ``benchmarks/make_adapters.py``.
"""

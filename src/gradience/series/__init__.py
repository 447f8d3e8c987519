"""A checkpoint series (``gradience series OUT/checkpoint-*``): per checkpoint the audit summary and UDR,
joined with the eval metrics the Trainer logged, and a suggested checkpoint stated as a fact (best eval metric,
and how rank use and UDR moved up to it), never a prediction.

Why: users keep several checkpoints and pick one by hand; the Trainer's ``trainer_state.json`` already holds
the eval history, and the audit (one SVD path, ``audit.spectrum``) plus UDR (the one base resolver,
``udr.resolve``) say what the adapter looked like at each of them.
"""

from gradience.series.core import SCHEMA, SeriesOptions, run_series

__all__ = ["SCHEMA", "SeriesOptions", "run_series"]

"""The offline toy LoRA run of the golden path (SPEC §8): shipped sentiment data (``dataset``), a tiny
locally built model and tokenizer (``model``), and the Trainer run with Gradience telemetry (``run``).

Nothing heavy is imported here; torch / transformers / peft are imported when a run starts.
"""

"""Training-framework integrations. ``gradience.integrations.hf``: ``GradienceCallback`` for the Hugging Face
Trainer (imports transformers; needs the ``hf`` extra). Plain loops use ``gradience.telemetry.TelemetryWriter``.
"""

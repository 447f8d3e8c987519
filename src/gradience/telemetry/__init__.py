"""Telemetry v1 (``gradience.vnext.telemetry/v1``): typed payloads, the writer and the streaming reader."""

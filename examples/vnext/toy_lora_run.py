#!/usr/bin/env python
"""Toy LoRA run for the Gradience golden path (offline, CPU, well under a minute).

    python examples/vnext/toy_lora_run.py --out runs/toy --device cpu

Trains a tiny DistilBERT-shaped classifier (built locally, random init) with LoRA on the shipped
``gradience/tiny-sentiment`` data through the Hugging Face Trainer and ``GradienceCallback``, then writes
``runs/toy/run.jsonl``, ``runs/toy/peft/`` and ``runs/toy/training/training_args.json`` and prints the next
three commands (check / monitor / audit). ``--model`` / ``--dataset`` take hub ids or local paths.
All the logic lives in ``gradience.toy.run`` (``gradience demo`` reuses it); this file only calls it.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from gradience.toy.run import main
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    from gradience.toy.run import main

if __name__ == "__main__":
    sys.exit(main(prog=Path(__file__).name))

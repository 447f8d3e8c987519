"""Pretrain the built-in tiny model once and write its package data (issue 18 item 4).

    python scripts/pretrain_toy.py    # writes src/gradience/toy/data/tiny_distilbert*.{safetensors,json}

Masked-LM + [CLS] bag-of-words pretraining of the 2-block DistilBERT on generated review sentences
(gradience/toy/pretrain.py has the recipe: corpus seed, steps, batch, lr). One CPU thread, fixed seeds: the
same torch build gives the same tensors (safetensors writes its metadata map in no fixed order, so the header
bytes may differ).
"""

from __future__ import annotations

import sys

from gradience.toy.pretrain import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m gradience.bench --config F ...``: the same as ``gradience bench`` (the seed's command)."""

from __future__ import annotations

import sys

from gradience.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))

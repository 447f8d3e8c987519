"""``python -m gradience.bench.worker SPEC.json``: train one arm in each process of ``accelerate launch``.

The parent bench writes SPEC.json (the resolved config, the seed, the LoRA, the arm directory) and launches
this under accelerate; the Trainer does DDP; the main process writes the adapter and the run log. Errors
exit 2 with one line, like every Gradience command.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    from gradience.bench.config import BenchConfig
    from gradience.bench.tasks import prepare_task
    from gradience.bench.train import LoraSpec, train_arm
    from gradience.errors import GradienceError

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m gradience.bench.worker SPEC.json", file=sys.stderr)
        return 2
    try:
        spec = json.loads(Path(args[0]).read_text(encoding="utf-8"))
        cfg = BenchConfig.from_state(spec["config"])
        task = prepare_task(cfg, Path(spec["output_dir"]))
        train_arm(task, cfg, int(spec["seed"]), LoraSpec.from_dict(spec["lora"]), Path(spec["arm_dir"]),
                  spec.get("device", "cpu"))
    except (OSError, ValueError, KeyError) as exc:
        print(f"gradience bench worker: error: {args[0]}: {exc}", file=sys.stderr)
        return 2
    except GradienceError as exc:
        print(f"gradience bench worker: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

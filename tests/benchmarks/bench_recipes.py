"""The results table of docs/recipes/README.md: every seed workflow run end to end.

For each recipe in ``tests/recipes/`` (MemBrain-seg, Allen Segmenter, MISIC, cellcutter,
PartSeg/torch-em) this runs the recipe page's command sequence with the real CLI on its
phantom (and on the real files with ground truth, where the recipe has them), and prints
one JSON line per recipe and data set: the classic method's score and the trained model's
score against the ground truth (Dice/IoU, or instance F1 at IoU 0.5), plus the model's
gain over its peer, the classic method of the same run. A final line summarises.

    python tests/benchmarks/bench_recipes.py [--only allen,membrain] [--keep DIR]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

RECIPES = ("membrain", "allen", "misic", "cellcutter", "partseg")


def headline(score: dict) -> tuple[str, float] | None:
    """The score a row is ranked by: instance F1 when present, else Dice."""
    for key in ("f1", "dice"):
        if isinstance(score, dict) and key in score:
            return key, float(score[key])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(RECIPES),
                        help="comma-separated recipes to run")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep every recipe's files under this folder")
    args = parser.parse_args()
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        for name in args.only.split(","):
            try:
                module = importlib.import_module(f"tests.recipes.{name}")
            except ImportError as exc:
                failed.append({"recipe": name, "error": f"not available: {exc}"})
                continue
            t0 = time.perf_counter()
            try:
                results = module.run(base / name)
            except Exception as exc:  # noqa: BLE001 - one broken recipe must not hide the rest
                failed.append({"recipe": name, "error": str(exc)[-800:]})
                continue
            for row in results:
                classic, model = headline(row.get("classic")), headline(row.get("model"))
                if classic and model and classic[0] == model[0]:
                    row["metric"] = classic[0]
                    row["gain_vs_classic"] = round(model[1] - classic[1], 4)
                row.setdefault("seconds", round(time.perf_counter() - t0, 1))
                rows.append(row)
                print(json.dumps(row), flush=True)
    for f in failed:
        print(json.dumps(f), flush=True)
    wins = sum(1 for r in rows if r.get("gain_vs_classic", 0) > 0)
    print(json.dumps({"recipes_run": len({r["recipe"] for r in rows}),
                      "rows": len(rows), "model_beats_classic": wins,
                      "failed": [f["recipe"] for f in failed]}))


if __name__ == "__main__":
    main()

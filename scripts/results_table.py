"""Print a Markdown table of the final accuracies of the run directories under a folder.

Usage: python scripts/results_table.py outputs/results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def main(root: str) -> None:
    rows = []
    for run in sorted(Path(root).iterdir()):
        metrics, cfg_file = run / "metrics.jsonl", run / ".hydra" / "config.yaml"
        if not (metrics.is_file() and cfg_file.is_file()):
            continue
        cfg = yaml.safe_load(cfg_file.read_text())
        evals = [r for r in map(json.loads, metrics.read_text().splitlines()) if "acc_mean" in r]
        if not evals:
            continue
        last = evals[-1]
        rows.append((cfg["dataset"]["name"], cfg["ipc"], cfg["preset"]["name"], cfg["iterations"], last["acc_mean"],
                     last["acc_std"], last.get("seconds", 0.0)))
    print("| dataset | ipc | method | iterations | accuracy % (mean ± std) | distill seconds |")
    print("|---|---|---|---|---|---|")
    for d, ipc, m, it, acc, std, sec in sorted(rows, key=lambda r: (r[0], r[1], r[2] != "random", r[2])):
        print(f"| {d} | {ipc} | {m} | {it} | {acc:.2f} ± {std:.2f} | {sec:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/results")

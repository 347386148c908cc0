"""Print a Markdown table of the final accuracies of the run directories under a folder.

Usage: python scripts/results_table.py outputs/results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


# accuracies a method reports under its paper's own protocol, logged next to the shared evaluator's: the kernel
# regression prediction of the test split from S (KIP, RFAD) and DD's replay of its learned steps from theta_0
OWN = ("krr_acc", "dd_replay_acc", "frepo/acc_mean", "kip/acc_mean", "rfad/acc_mean")


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
        choices = yaml.safe_load((run / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"]["choices"]
        own = " ".join(f"{k} {last[k]:.2f}" for k in OWN if k in last) or "-"
        rows.append((cfg["dataset"]["name"], cfg["ipc"], cfg["preset"]["name"], choices["init"], cfg["iterations"],
                     last["acc_mean"],
                     last["acc_std"], own, last.get("seconds", 0.0)))
    print("| dataset | ipc | method | init | iterations | accuracy % (mean ± std) | method's own protocol % | "
          "distill seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for d, ipc, m, init, it, acc, std, own, sec in sorted(rows, key=lambda r: (r[0], r[1], r[2] != "random", r[2])):
        print(f"| {d} | {ipc} | {m} | {init} | {it} | {acc:.2f} ± {std:.2f} | {own} | {sec:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/results")

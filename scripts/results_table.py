"""Print a Markdown table of the final accuracies of the run directories under a folder, from their run records
(``results.json``).

Usage: python scripts/results_table.py outputs/results
"""

from __future__ import annotations

import sys
from pathlib import Path

from ddrun.record import read


def main(root: str) -> None:
    rows = []
    for run in sorted(Path(root).iterdir()):
        if not (run / "results.json").is_file():
            continue
        rec = read(run)
        if not rec["evaluations"]:
            continue
        last, *others = rec["evaluations"]
        init = str(rec.get("setting", {}).get("init._target_", "?")).rsplit(".", 1)[-1]
        # the accuracies a method reports under its paper's own protocol, beside the shared evaluator's: the kernel
        # regression prediction of the test split from S (KIP, RFAD), DD's replay of its learned steps, the
        # `beside` evaluators (FRePo / KIP / RFAD's finite-network protocols)
        own = [f"{k.removesuffix('_acc')} {v:.2f}" for k, v in last.get("extra", {}).items()]
        own += [f"{e['protocol'].get('evaluator')} {e['acc_mean']:.2f}" for e in others]
        rows.append((rec["dataset"], rec["ipc"], rec["method"], init, rec["iterations"], last["acc_mean"],
                     last["acc_std"], " ".join(own) or "-", rec.get("seconds") or 0.0))
    print("| dataset | ipc | method | init | iterations | accuracy % (mean ± std) | method's own protocol % | "
          "distill seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for d, ipc, m, init, it, acc, std, own, sec in sorted(rows, key=lambda r: (r[0], r[1], r[2] != "random", r[2])):
        print(f"| {d} | {ipc} | {m} | {init} | {it} | {acc:.2f} ± {std:.2f} | {own} | {sec:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/results")

"""Benchmark: the cost of preemption safety — checkpoint size and save time, and the resume overhead (seconds from
starting ``ddrun distill`` to its first new iteration, against the same for a fresh start), as a table.

For each case: a run of ``--iters`` iterations writes its checkpoint; then the same command is started again as a
new process (what a requeued SLURM job does) and timed from ``Popen`` until ``metrics.jsonl`` holds the first
iteration it computed (``log_every=1``); the fresh start is timed the same way in an empty directory. Both include
the interpreter, torch and Hydra start-up and the dataset load; the resume adds reading the checkpoint and
restoring S, the optimizer, the RNG states and the metrics (the initializer is not run again). "restore" is the
in-process part the run logs ("restored in X s": dataset load included).

Usage:
    python scripts/bench_resume.py                                  # Fashion-MNIST, DM, ipc 1/10/50
    python scripts/bench_resume.py --methods dm,dsa --ipc 10 --set dataset.train_subset=500
    python scripts/bench_resume.py --dataset cifar10 --device cuda
    python scripts/bench.py --groups resume --ipc 1,10          # the same table from the benchmark script
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rows(run: Path) -> list[int]:
    try:
        text = (run / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line)["iteration"] for line in text.splitlines() if line.endswith("}")]


def first_iteration(cmd: list[str], run: Path, target: int, timeout: float = 1800) -> tuple[float, str]:
    """Seconds from starting ``cmd`` until ``metrics.jsonl`` of ``run`` holds iteration ``target``; then stop it."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while target not in rows(run):
        if proc.poll() is not None:
            raise SystemExit(f"{' '.join(cmd)} exited ({proc.returncode}):\n{proc.stdout.read()[-2000:]}")
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            raise SystemExit(f"timed out: {' '.join(cmd)}")
        time.sleep(0.005)
    elapsed = time.perf_counter() - t0
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate()[0]
    return elapsed, out


def case(method: str, ipc: int, args) -> dict:
    import torch

    from ddrun.checkpoint import load_checkpoint, save_checkpoint

    base = ROOT / "outputs" / "bench_resume" / f"{method}_ipc{ipc}"
    shutil.rmtree(base, ignore_errors=True)
    k = args.iters
    common = [sys.executable, "-m", "ddrun.cli", "distill", f"method={method}", f"ipc={ipc}",
              f"dataset={args.dataset}", f"device={args.device}", "logger=none", "evaluator.num_eval=0",
              "log_every=1", "eval_at_start=false", f"eval_every={k + 100}", f"checkpoint_every={k}", *args.set]
    # a run of k iterations leaves its checkpoint
    first = subprocess.run([*common, f"iterations={k}", f"hydra.run.dir={base / 'run'}"], cwd=ROOT,
                           capture_output=True, text=True)
    if first.returncode != 0:
        raise SystemExit(f"{method} ipc{ipc}: {first.stderr[-2000:]}")
    ckpt_file = base / "run" / "checkpoint.pt"
    state = load_checkpoint(ckpt_file)
    state.pop("path")
    (base / "copy").mkdir(parents=True)
    t0 = time.perf_counter()
    save_checkpoint(state, base / "copy" / "checkpoint.pt")  # what every checkpoint costs the run
    save_s = time.perf_counter() - t0
    fresh_s, _ = first_iteration([*common, f"iterations={k + 3}", f"hydra.run.dir={base / 'fresh'}"],
                                 base / "fresh", 1)
    resume_s, out = first_iteration([*common, f"iterations={k + 3}", f"hydra.run.dir={base / 'run'}"],
                                    base / "run", k + 1)
    restored = re.search(r"restored in ([0-9.]+) s", out)
    per_it = (state["seconds"] / k) if k else float("nan")
    return {"case": f"{method} ipc{ipc}", "ckpt_mb": ckpt_file.stat().st_size / 2**20, "save_s": save_s,
            "iteration_s": per_it, "fresh_s": fresh_s, "resume_s": resume_s,
            "restore_s": float(restored.group(1)) if restored else float("nan"),
            "device": args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")}


def main(argv: list[str] | None = None) -> None:
    """Run the cases and print the table (``argv``: command-line arguments; ``scripts/bench.py --groups resume``
    calls this)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="dm")
    p.add_argument("--ipc", default="1,10,50")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--device", default="auto")
    p.add_argument("--iters", type=int, default=10, help="iterations before the stop (default 10)")
    p.add_argument("--set", nargs="*", default=[], help="extra overrides for every case, e.g. paths.data=...")
    args = p.parse_args(argv)
    results = [case(m, int(i), args) for m in args.methods.split(",") for i in args.ipc.split(",")]
    print(f"dataset {args.dataset}, overrides {' '.join(args.set) or '(none)'}, stop after {args.iters} iterations")
    print("| case | device | checkpoint MB | save s | s/iteration | fresh: start -> 1st iteration s | "
          "resume: start -> 1st new iteration s | resume overhead s | restore s (in-process) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['device']} | {r['ckpt_mb']:.2f} | {r['save_s']:.3f} | {r['iteration_s']:.3f} | "
              f"{r['fresh_s']:.2f} | {r['resume_s']:.2f} | {r['resume_s'] - r['fresh_s']:+.2f} | "
              f"{r['restore_s']:.2f} |")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

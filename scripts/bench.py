"""Benchmarks: seconds per outer iteration and peak memory of the distillation objectives, as a table.

Each case runs in its own subprocess (so memory peaks do not mix): it composes the real config with the case's
overrides, builds S, the fetcher and the objective exactly as ``ddrun distill`` does, runs ``--warmup`` outer
iterations, then times ``--iters`` outer iterations (one fetched network and its ``outer_loop`` updates of S,
inner training included). Peak memory: CUDA ``max_memory_allocated`` on a GPU; on the CPU the peak resident set
size above the level reached before the first timed iteration (sampled every 2 ms).

Usage:
    python scripts/bench.py                         # every group, defaults (the papers' settings) + --set
    python scripts/bench.py --groups basic --ipc 1,10 --set objective.batch_real=64
    python scripts/bench.py --device cuda --dataset cifar10
    python scripts/bench.py --groups perf --only 'kip|rfad' --set objective.kernel.n_models=1   # some cases
    python scripts/bench.py --groups resume --ipc 1,10      # resume overhead after a kill (scripts/bench_resume.py)
    python scripts/bench.py --groups decoupled --ipc 10,50 --set net=convnet_bn   # SRe2L / EDC recover iterations
    python scripts/bench.py --groups eval --eval-epochs 300  # 5 ConvNets at ipc 10: one after the other vs stacked
    python scripts/bench.py --save base.json                # on one commit ...
    python scripts/bench.py --compare base.json             # ... then on another: speed ratio of every case
    python scripts/bench.py --groups eval --eval-epochs 20 --only stacked --profile 25   # where the time goes
    python scripts/bench.py --groups eval --eval-warmup 1 --only stacked --set speed.compile=true  # after compiling

Groups are registered in ``GROUPS``: a name -> function returning a list of ``(label, overrides)``; a case may
also name a ``setup`` callable (e.g. to build a buffer first) through ``SETUPS``. The ``eval`` group times the
evaluator instead of the loop (``EVAL_GROUPS``): ``num_eval`` ConvNets x ``--eval-epochs`` epochs on the real
initialization of S at ipc 10 (the evaluation protocol of DC/DSA/DM), sequential (``evaluator.ensemble=false``)
against stacked (``true``), with the accuracies, so the two protocols can be compared (they agree up to float
rounding carried through training).

``--save FILE`` writes every case's result (JSON, with the commit); ``--compare FILE`` adds a column with the
speed ratio ``baseline seconds / seconds`` of each case found in FILE (> 1: this commit is faster). Speed settings
(``conf/speed``: ``speed.channels_last``, ``speed.batched_classes`` ...) and ``deterministic=true`` are overrides
like any other (``--set speed.channels_last=false``).

``--profile N`` runs the timed region of every case under ``torch.profiler`` (CPU, and CUDA on a GPU) and prints,
after the table, the N operators with the most self time (device time on a GPU, CPU time on the CPU). The table's
times are then measured under the profiler, which slows launch-bound code: use them for where the time goes, not
for speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def basic_cases(args) -> list[tuple[str, list[str]]]:
    """DM, DC and DSA at each ipc (issue 2)."""
    return [(f"{m} ipc{ipc}", [f"method={m}", f"ipc={ipc}"]) for m in ("dm", "dc", "dsa") for ipc in args.ipc]


def perf_matching_cases(args) -> list[tuple[str, list[str]]]:
    """Performance matching (issue 4): DD, KIP, RFAD, FRePo at each ipc."""
    return [(f"{m} ipc{ipc}", [f"method={m}", f"ipc={ipc}"]) for m in ("dd", "kip", "rfad", "frepo")
            for ipc in args.ipc]


MTT_BUFFERS = ROOT / "outputs" / "bench_buffers"
MTT_DATA = ["dataset.train_subset=50", f"paths.buffers={MTT_BUFFERS}"]


def mtt_cases(args) -> list[tuple[str, list[str]]]:
    """Trajectory matching (issue 3): syn_steps 10 -> 20 -> 40, plain unrolled gradient vs TESLA's memory-efficient
    one (``objective.memory_efficient``), at each ipc. Plain memory grows linearly with syn_steps, memory-efficient
    stays flat (it keeps one step's graph plus the parameter vectors). The experts come from a one-expert buffer
    that :func:`mtt_setup` makes (timing does not depend on the experts' values); start epoch 0, segment 2."""
    cases = []
    for ipc in args.ipc:
        for steps in (10, 20, 40):
            for me in (False, True):
                label = f"mtt ipc{ipc} syn_steps {steps} {'memory-efficient' if me else 'plain'}"
                SETUPS[label] = mtt_setup
                cases.append((label, ["method=mtt", f"ipc={ipc}", f"objective.syn_steps={steps}",
                                      f"objective.memory_efficient={str(me).lower()}", "objective.batch_syn=null",
                                      "fetcher.max_start_epoch=1", "fetcher.expert_epochs=2", *MTT_DATA]))
    return cases


def mtt_setup(args) -> None:
    """``ddrun buffer`` with one expert x 2 epochs for the benchmark's dataset (once per bench run; the command
    itself skips an expert that is already there)."""
    if getattr(mtt_setup, "done", False):
        return
    mtt_setup.done = True
    r = subprocess.run([sys.executable, "-m", "ddrun.cli", "buffer", f"dataset={args.dataset}", f"device={args.device}",
                        "num_experts=1", "train_epochs=2", *MTT_DATA, *[s for s in args.set if s.startswith("net.")],
                        f"hydra.run.dir={ROOT / 'outputs' / 'bench_buffers' / 'log'}"],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"mtt_setup: ddrun buffer failed: {r.stderr.strip()[-500:]}")


TEACHER_DATA = ["dataset.train_subset=50", f"paths.buffers={MTT_BUFFERS}"]


def decoupled_cases(args) -> list[tuple[str, list[str]]]:
    """The recover stage of the decoupled family (issue 11): SRe2L, G-VBSM and EDC at each ipc, seconds per recover
    iteration (one teacher forward/backward over all of S; G-VBSM adds the Conv and patch statistics and the
    eigenvalue term, EDC the Conv statistics and the EMA copy's forward for flatness) and peak memory. The teacher
    (the preset's net, ResNet-18-BN unless ``--set net=...``) comes from a one-epoch ``ddrun teacher`` on 50 images
    per class that :func:`teacher_setup` makes (timing does not depend on its accuracy). RDED has no recover
    iterations (its selection is a one-off pass of the observer)."""
    cases = []
    for ipc in args.ipc:
        for m in ("sre2l", "gvbsm", "edc"):
            label = f"{m} ipc{ipc} recover"
            SETUPS[label] = teacher_setup
            cases.append((label, [f"method={m}", f"ipc={ipc}", *TEACHER_DATA]))
    return cases


def teacher_setup(args) -> None:
    """``ddrun teacher`` with one teacher x 1 epoch for the benchmark's dataset and net (once per bench run)."""
    if getattr(teacher_setup, "done", False):
        return
    teacher_setup.done = True
    net = [s for s in args.set if s.startswith("net")] or ["net=resnet18_bn"]
    r = subprocess.run([sys.executable, "-m", "ddrun.cli", "teacher", f"dataset={args.dataset}",
                        f"device={args.device}", "recipe.epochs=1", "dataset.test_subset=10", *TEACHER_DATA, *net,
                        f"hydra.run.dir={ROOT / 'outputs' / 'bench_buffers' / 'log'}"],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"teacher_setup: ddrun teacher failed: {r.stderr.strip()[-500:]}")




def eval_cases(args) -> list[tuple[str, list[str]]]:
    """The evaluation protocol: ``num_eval`` ConvNets x ``--eval-epochs`` epochs on S at ipc 10 (its real
    initialization), trained one after the other vs stacked (``evaluator.ensemble``)."""
    return [(f"eval 5 convnets x {args.eval_epochs} epochs ipc10 {'stacked' if ens else 'sequential'}",
             ["method=dm", "ipc=10", "evaluator.num_eval=5", f"evaluator.epochs={args.eval_epochs}",
              f"evaluator.ensemble={str(ens).lower()}"]) for ens in (False, True)]


GROUPS = {"basic": basic_cases, "perf": perf_matching_cases, "mtt": mtt_cases, "decoupled": decoupled_cases,
          "eval": eval_cases}
EVAL_GROUPS = {"eval"}
# Groups with their own table: name -> function(args). "resume": checkpoint size, save time and the resume overhead
# (start -> first new iteration) of a killed DM run vs a fresh start (scripts/bench_resume.py; 10 iterations first).
TABLES = {"resume": lambda args: __import__("bench_resume").main(
    ["--methods", "dm", "--ipc", ",".join(map(str, args.ipc)), "--dataset", args.dataset, "--device", args.device,
     "--set", *args.set])}
SETUPS: dict[str, object] = {}


# ---------------------------------------------------------------------------------------------------------
# one case, in a subprocess
# ---------------------------------------------------------------------------------------------------------

class RssPeak:
    """Samples this process's resident set size (Linux /proc) in a thread; ``peak`` in bytes."""

    def __init__(self):
        self.peak, self._stop = self.rss(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


@contextlib.contextmanager
def profiled(rows: int, cuda: bool, out: dict):
    """``torch.profiler`` over the block when ``rows`` > 0: the table of the ``rows`` operators with the most self
    time (device time on a GPU) goes to ``out["profile"]``."""
    if rows <= 0:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        yield
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    out["profile"] = prof.key_averages().table(sort_by=key, row_limit=rows)


def run_case(overrides: list[str], warmup: int, iters: int, profile_rows: int = 0) -> dict:
    """Build the run exactly as ``ddrun distill`` does (``ddrun.distill.Distillation`` in a temporary directory, no
    evaluation, no logging) and time ``iters`` of its iterations after ``warmup``."""
    import tempfile

    import torch
    from hydra import compose, initialize_config_module

    from ddrun.distill import Distillation

    with initialize_config_module("ddrun.conf", version_base="1.3"):
        cfg = compose("distill", overrides=[*overrides, "evaluator.num_eval=0", "logger=none", "resume=false"])
    with tempfile.TemporaryDirectory() as tmp:
        run = Distillation(cfg, Path(tmp))
        try:
            for it in range(warmup):
                run.step(it)
            device = run.device
            cuda = device.type == "cuda"
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            prof: dict = {}
            with RssPeak() as mem, profiled(profile_rows, cuda, prof):
                base = RssPeak.rss()
                t0 = time.perf_counter()
                for it in range(warmup, warmup + iters):
                    run.step(it)
                if cuda:
                    torch.cuda.synchronize()
                dt = (time.perf_counter() - t0) / iters
        finally:
            run.tracker.close()
    peak = torch.cuda.max_memory_allocated() if cuda else mem.peak - base
    return {"seconds": dt, "peak_mb": peak / 2**20, "device": str(device), "outer_loop": run.schedule.steps,
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if cuda else None, **prof}


def run_eval_case(overrides: list[str], profile_rows: int = 0, warmup: int = 0) -> dict:
    """Time one evaluation (``cfg.evaluator`` on S from ``cfg.init``) as ``ddrun distill`` builds it, after
    ``warmup`` untimed ones in the same process (what a run's later evaluations find: ``speed.compile``'s
    compilation done, cuDNN's autotuning cached); the first one's seconds are kept as ``first_s``."""
    import statistics

    import torch
    from hydra import compose, initialize_config_module

    from ddrun import speed
    from ddrun.utils import build, derive_seed, resolve_device

    with initialize_config_module("ddrun.conf", version_base="1.3"):
        cfg = compose("distill", overrides=[*overrides, "logger=none"])
    speed.configure(cfg.speed, bool(cfg.deterministic))
    device = resolve_device(cfg.device)
    real = build(cfg.dataset).to(device)
    syn = build(cfg.init)(real, int(cfg.ipc), torch.Generator().manual_seed(derive_seed(int(cfg.seed), 1))).to(device)
    evaluator = build(cfg.evaluator)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def timed() -> tuple[dict, float]:
        t0 = time.perf_counter()
        res = speed.evaluate(evaluator, syn, real, int(cfg.seed), device)  # under speed.autocast, as ddrun does
        if cuda:
            torch.cuda.synchronize()
        return res, time.perf_counter() - t0

    first = timed()[1] if warmup > 0 else None
    for _ in range(warmup - 1):
        timed()
    prof: dict = {}
    with RssPeak() as mem, profiled(profile_rows, cuda, prof):
        base = RssPeak.rss()
        res, dt = timed()
    accs = res["per_net"][next(iter(res["per_net"]))]
    peak = torch.cuda.max_memory_allocated() if cuda else mem.peak - base
    return {"seconds": dt, "peak_mb": peak / 2**20, "device": str(device), "outer_loop": "-",
            "threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "acc": f"{statistics.fmean(accs):.2f} ± {statistics.pstdev(accs):.2f}", "first_s": first, **prof}


def commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return r.stdout.strip() or "unknown"


def row(label: str, res: dict, baseline: dict | None) -> str:
    dev = res["gpu"] or f"{res['device']} ({res['threads']} threads)"
    cells = [label, str(res["outer_loop"]), f"{res['seconds']:.3f}", f"{res['peak_mb']:.0f}", dev]
    if "acc" in res:
        cells.insert(3, res["acc"])
        cells.insert(3, "-" if res.get("first_s") is None else f"{res['first_s']:.3f}")
    if baseline is not None:
        old = baseline.get(label)
        cells.append(f"{old['seconds'] / res['seconds']:.2f}x ({old['seconds']:.3f})" if old else "-")
    return "| " + " | ".join(cells) + " |"


def header(eval_table: bool, baseline: dict | None) -> str:
    cols = ["case", "outer_loop", "s / evaluation" if eval_table else "s / outer iteration", "peak memory MB",
            "device"]
    if eval_table:
        cols.insert(3, "accuracy % (mean ± std)")
        cols.insert(3, "s first evaluation (--eval-warmup)")
    if baseline is not None:
        cols.append(f"speed vs {baseline.get('_commit', 'baseline')} (its s)")
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--groups", default="basic,perf,mtt", help=f"comma-separated, from {[*GROUPS, *TABLES]}")
    p.add_argument("--ipc", default="1,10", help="comma-separated ipc values")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--device", default="auto")
    p.add_argument("--iters", type=int, default=2, help="timed outer iterations per case")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--set", nargs="+", action="extend", default=[],
                   help="extra overrides for every case (state them in reports); repeated --set flags add up")
    p.add_argument("--only", help="regular expression: run only the cases whose label matches, e.g. 'kip|rfad'")
    p.add_argument("--eval-epochs", type=int, default=300, help="epochs of each network in the eval group")
    p.add_argument("--eval-warmup", type=int, default=0, metavar="N",
                   help="eval group: N untimed evaluations first in the same process (compilation, autotuning)")
    p.add_argument("--save", help="write every case's result to this JSON file (a baseline for --compare)")
    p.add_argument("--compare", help="a JSON file written by --save: add the speed ratio of every case to it")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="print each case's N operators with the most self time (torch.profiler; times under it)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        spec = json.loads(args.one)
        out = run_eval_case(spec["overrides"], spec["profile"], spec["eval_warmup"]) if spec.get("eval") else \
            run_case(spec["overrides"], spec["warmup"], spec["iters"], spec["profile"])
        print(json.dumps(out))
        return
    args.ipc = [int(i) for i in args.ipc.split(",")]
    groups = args.groups.split(",")
    unknown = [g for g in groups if g not in GROUPS and g not in TABLES]
    if unknown:
        p.error(f"unknown group(s) {unknown}; choose from {[*GROUPS, *TABLES]}")
    common = [f"dataset={args.dataset}", f"device={args.device}", "logger=none", *args.set]
    baseline = None
    if args.compare:
        try:
            baseline = json.loads(Path(args.compare).read_text())
        except (OSError, ValueError) as exc:
            p.error(f"--compare {args.compare}: not a file written by --save ({type(exc).__name__}: {exc})")
    labels = [label for g in groups if g in GROUPS for label, _ in GROUPS[g](args)]
    if args.only and not any(re.search(args.only, label) for label in labels):
        p.error(f"--only {args.only!r} matches no case of the groups {groups}")
    print(f"# scripts/bench.py  commit {commit()}  dataset={args.dataset}  iters={args.iters} (+{args.warmup} warm-up)"
          f"  extra overrides: {' '.join(args.set) or '(none: the papers settings)'}")
    results: dict = {"_commit": commit(), "_args": vars(args)}
    for eval_table in (False, True):
        chosen = [g for g in groups if g in GROUPS and (g in EVAL_GROUPS) == eval_table]
        if chosen:
            print(header(eval_table, baseline), flush=True)
        for group in chosen:
            for label, overrides in GROUPS[group](args):
                if args.only and not re.search(args.only, label):
                    continue
                if label in SETUPS:
                    SETUPS[label](args)
                spec = json.dumps({"overrides": [*common, *overrides], "warmup": args.warmup, "iters": args.iters,
                                   "eval": eval_table, "profile": args.profile, "eval_warmup": args.eval_warmup})
                r = subprocess.run([sys.executable, __file__, "--one", spec], capture_output=True, text=True, cwd=ROOT)
                if r.returncode != 0:
                    msg = (r.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"| {label} | - | failed: {msg[:80]} | - | - |", flush=True)
                    continue
                results[label] = json.loads(r.stdout.strip().splitlines()[-1])
                print(row(label, results[label], baseline), flush=True)
    for label, res in results.items():
        if not label.startswith("_") and "profile" in res:
            print(f"\n{label} (under torch.profiler):\n```\n{res.pop('profile').rstrip()}\n```", flush=True)
    if args.save:
        Path(args.save).write_text(json.dumps(results, indent=1))
    for group in (g for g in groups if g in TABLES):
        print(flush=True)
        TABLES[group](args)


if __name__ == "__main__":
    main()

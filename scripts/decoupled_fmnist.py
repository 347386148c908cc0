"""The Fashion-MNIST tables of the decoupled family (issue 11), at CPU-sized budgets, end to end:

    python scripts/decoupled_fmnist.py teacher     # ddrun teacher: ConvNet-BN-64, SRe2L recipe, 8 epochs (stated)
    python scripts/decoupled_fmnist.py distill     # S for random / RDED / SRe2L (+ r_bn 1) / EDC / G-VBSM, ipc 1 10 50
    python scripts/decoupled_fmnist.py evaluate    # every S under the one KD protocol and the hard-label protocol
    python scripts/decoupled_fmnist.py table       # the Markdown table from the results.json files

Everything goes under ``outputs/fm`` (``--out``); each step is a plain ``ddrun`` command (printed before it runs) and
is skipped when its result exists, so a killed run continues. Budgets (CPU, 2 shared cores): the teacher is a
ConvNet-BN of width 64 trained 8 epochs (not 200) on the full training set; SRe2L recovers for the reference's 1000
iterations; EDC, G-VBSM and RDED run their presets' settings (EDC: 75 iterations, G-VBSM: 4000). The one KD protocol:
a ConvNet-BN-32 student, ``KD_EPOCHS`` epochs, the evaluator=kd defaults otherwise (AdamW 1e-3, smoothing
zeta 2, RandomResizedCrop + flip + CutMix, KL T 20, RDED's batch per ipc), the same teacher for every S; the
hard-label protocol: ConvNet-32 (instance norm), 300 epochs, the DC protocol otherwise (evaluator=default).
``--methods dm`` adds DM (200 iterations, ConvNet-32, batch_real 64) under the same two protocols; ``--methods mtt``
MTT at issue 3's CPU setting, after ``python scripts/decoupled_fmnist.py buffer`` (three ConvNet-128 experts, 300
images per class, 10 epochs).
``evaluate --kd-scale 1.0`` evaluates under the KD protocol without the crop (RDED's own validation at factor 1);
``--num-eval N`` other than the default (4 students under KD at ipc 1, else 2) is its own row (``kdn8``);
``evaluate --kd-student resnet18_bn`` trains the issue's default student, ResNet-18-BN (CIFAR stem), instead of the
ConvNet-BN-32 (``kdr18``).

The pool of five backbones (README "A pool of five backbones"; EDC's CIFAR pool without MobileNet-V2, ResNet-18 and
WRN-16-2), with its own ``--out``, e.g. ``--out outputs/fm_pool --teacher convnet_bn_w32 --teacher-epochs 2``:
``teacher --pool`` also trains ConvNet-BN-D1, -D2, -128 and ShuffleNet-V2 x0.5 with the same recipe;
``distill --methods edc_pool5`` recovers EDC against the five, cycled; ``evaluate --kd-pool`` is the KD protocol with
the five teachers' mean logits (rows ``kdp``). ``--dry-run`` prints the commands without running them.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IPCS = (1, 10, 50)
# every row the table knows, in its order
METHODS = ("random", "rded", "sre2l", "sre2l_rbn1", "edc", "gvbsm", "gvbsm_roll4", "gvbsm_pool", "gvbsm_pool_roll4",
           "edc_pool", "edc_pool5", "rded_f2", "dm", "mtt")
# what `--methods` runs by default: the random subset and every decoupled preset (named, not a slice of METHODS,
# which once dropped EDC silently as the list grew)
DEFAULT_METHODS = ("random", "rded", "sre2l", "sre2l_rbn1", "edc", "gvbsm")
# the one teacher, by `--teacher` (passed to every step): ConvNet-BN-64 for the main table, ConvNet-BN-32 for the
# pool's (README)
TEACHERS = {"convnet_bn_w64": ["net=convnet_bn", "net.width=64"], "convnet_bn_w32": ["net=convnet_bn", "net.width=32"]}
# the four other backbones of the pool of five (EDC's ConvNetD1, ConvNetD2, ConvNetW128, ShuffleNetV2_0_5): each a
# `ddrun teacher` of its own, then one `+net@<key>.<name>=...` entry of the recover's pool or the KD labels' ensemble
POOL = {"d1": ["convnet_bn", "depth=1"], "d2": ["convnet_bn", "depth=2"], "w128": ["convnet_bn"],
        "sh": ["shufflenet_v2"]}


def pool_overrides(key: str) -> list[str]:
    """The four pool members added under ``key`` (``fetcher.extra_nets`` or ``evaluator.extra_teacher_nets``)."""
    return [o for name, (net, *kw) in POOL.items()
            for o in (f"+net@{key}.{name}={net}", *(f"{key}.{name}.{k}" for k in kw))]


# variants: a method's preset with overrides. SRe2L's r_bn 0.01 (its CIFAR value) with a teacher of only 3 BatchNorm
# layers leaves one mode per class (the images of a class look alike); r_bn 1 is SRe2L's Tiny-ImageNet value.
# G-VBSM's roll of up to 32 px is a full cycle on CIFAR's 32 px images and is derived as 28 px here; "gvbsm_roll4"
# shifts by SRe2L's 4 px instead.
# "*_pool": G-VBSM's / EDC's multi-backbone recover with a second teacher, ConvNet-BN-32 (`ddrun teacher net=convnet_bn
# net.width=32`), cycled per iteration with the ConvNet-BN-64 (its labels and the KD protocol keep the one teacher).
W32 = ("+fetcher.extra_nets.convnet_bn_w32={_target_: ddrun.nets.ConvNet, _partial_: true, width: 32, depth: 3, "
       "act: relu, norm: batchnorm, pooling: avgpooling}")
# EDC's and G-VBSM's own evaluation queries an ensemble of teachers online (EDC direct_train.py): `--kd-ensemble`
# averages the ConvNet-BN-64 teacher's logits with the ConvNet-BN-32 one's, for every S alike (rows "kde")
ENSEMBLE = W32.replace("fetcher.extra_nets", "evaluator.extra_teacher_nets")
VARIANTS = {"sre2l_rbn1": ("sre2l", ["objective.r_bn=1.0"]), "gvbsm_roll4": ("gvbsm", ["objective.augment.roll=4"]),
            "gvbsm_pool": ("gvbsm", [W32]), "gvbsm_pool_roll4": ("gvbsm", [W32, "objective.augment.roll=4"]),
            "edc_pool": ("edc", [W32]), "edc_pool5": ("edc", pool_overrides("fetcher.extra_nets")),
            "rded_f2": ("rded", ["init.factor=2"])}
# earlier methods' S evaluated by the same two protocols (`--methods dm --ipc 10`): DM at a CPU budget
EARLIER = {"dm": ["net.width=32", "iterations=200", "objective.batch_real=64"],
           # MTT at issue 3's CPU setting (README "Trajectory matching"), from the `buffer` step's three experts
           "mtt": ["dataset.train_subset=300", "fetcher.expert_epochs=2", "fetcher.max_start_epoch=4",
                   "fetcher.max_experts=3"]}
EARLIER_BY_IPC = {"mtt": {1: ["iterations=200", "objective.syn_steps=20"],
                          10: ["iterations=150", "objective.syn_steps=15", "objective.batch_syn=20"],
                          50: ["iterations=100", "objective.syn_steps=15", "objective.batch_syn=50"]}}
# MTT's expert buffer (README "Trajectory matching": ConvNet-128, 300 images per class, 10 epochs, DSA)
BUFFER = ["dataset.train_subset=300", "num_experts=3", "train_epochs=10", "batch_train=64"]
# RDED's 300 epochs at RDED's batch per ipc are 300 / 600 / 1500 student steps at ipc 1 / 10 / 50: at ipc 1 and 10
# the students are far from converged (random real subset, ipc 1: 47.4 % after 300 epochs, 73.7 % after 1000), so
# the epochs are raised to at least 1000 steps (EDC's CIFAR protocol runs 1000 epochs).
KD_EPOCHS = {1: 1000, 10: 500, 50: 300}
HARD = ["evaluator=default", "net=convnet", "net.width=32", "evaluator.epochs=300"]


# other students (`--kd-student`): the overrides and the row suffix
STUDENTS = {"convnet_bn_w32": (["net@evaluator.student=convnet_bn", "evaluator.student.width=32"], ""),
            "resnet18_bn": (["net@evaluator.student=resnet18_bn"], "r18")}
STUDENT = "convnet_bn_w32"  # the table's student


def kd_protocol(ipc: int, teacher: str, epochs: int | None = None, student: str = STUDENT) -> list[str]:
    return ["evaluator=kd", *TEACHERS[teacher], *STUDENTS[student][0], f"evaluator.epochs={epochs or KD_EPOCHS[ipc]}"]


def run(cmd: list[str], args) -> None:
    full = [sys.executable, "-m", "ddrun.cli", *cmd, "dataset=fashion_mnist", f"paths.data={args.data}",
            f"paths.buffers={args.out / 'store'}", *(["logger=none"] if cmd[0] in ("distill", "evaluate") else [])]
    # (teacher and buffer have no logger group: `buffer logger=none` stopped with "this command has no 'logger'
    # group" until the dry-run test composed every command)
    print("$ ddrun " + " ".join(shlex.quote(c) for c in full[3:]), flush=True)
    if not args.dry_run:
        subprocess.run(full, check=True, cwd=ROOT)


def teacher(args) -> None:
    nets = {"teacher": TEACHERS[args.teacher]}
    if args.pool:  # the pool's other four, same recipe (a teacher already in the store is kept: `ddrun teacher`)
        nets.update({name: [f"net={net}", *(f"net.{k}" for k in kw)] for name, (net, *kw) in POOL.items()})
    for name, net in nets.items():
        run(["teacher", *net, f"recipe.epochs={args.teacher_epochs}", "test_every=1",
             f"hydra.run.dir={args.out / name}"], args)


def buffer(args) -> None:
    """MTT's experts (``--methods mtt``), in the same artefact store as the teacher."""
    run(["buffer", *BUFFER, f"hydra.run.dir={args.out / 'buffer'}"], args)


def s_dir(args, method: str, ipc: int) -> Path:
    return args.out / "S" / f"{method}_ipc{ipc}"


def distill(args) -> None:
    for ipc in args.ipc:
        for m in args.methods:
            d = s_dir(args, m, ipc)
            if (d / "synthetic.pt").is_file() and not args.dry_run:
                continue
            method, extra = VARIANTS.get(m, (m, EARLIER.get(m, []) + EARLIER_BY_IPC.get(m, {}).get(ipc, [])))
            iterations = {"sre2l": args.sre2l_iterations, "gvbsm": args.gvbsm_iterations}.get(method)
            if iterations:
                extra = [f"iterations={iterations}", *extra]
            net = [] if m in ("random", *EARLIER) else TEACHERS[args.teacher]
            run(["distill", f"method={method}", f"ipc={ipc}", *net, *extra, "evaluator.num_eval=0",
                 f"hydra.run.dir={d}"], args)


def evaluate(args) -> None:
    for ipc in args.ipc:
        for m in args.methods:
            protocols = [(p, kd_protocol(ipc, args.teacher) if p == "kd" else HARD) for p in args.protocols.split(",")]
            if args.kd_epochs or args.kd_scale or args.kd_ensemble or args.kd_student or args.kd_pool:  # a variant
                protocols = [kd_variant(ipc, args.teacher, args.kd_epochs, args.kd_scale, args.kd_ensemble,
                                        args.kd_student, args.kd_pool)]
            for proto, over in protocols:
                n, default = args.num_eval or num_students(proto, ipc), num_students(proto, ipc)
                # another number of students than the default is another row (kd -> kdn8), not a rerun in place
                d = args.out / "eval" / f"{m}_ipc{ipc}_{proto}{'' if n == default else f'n{n}'}"
                if (d / "results.json").is_file() and not args.dry_run:
                    continue
                run(["evaluate", f"synthetic={s_dir(args, m, ipc) / 'synthetic.pt'}", *over,
                     f"evaluator.num_eval={n}", f"label={m}", f"hydra.run.dir={d}"], args)


def kd_variant(ipc: int, teacher: str, epochs: int | None, scale: float | None, ensemble: bool = False,
               student: str | None = None, pool: bool = False) -> tuple[str, list[str]]:
    """The KD protocol with another number of epochs (``kd300``), crop scale (``kds1.0``: RandomResizedCrop (1, 1),
    i.e. no crop, RDED's validation at factor 1), the two-teacher ensemble (``kde``), the pool of five's mean
    logits (``kdp``) and / or another student (``kdr18``: ResNet-18-BN), composed (e.g. ``kd300s1.0e``): its row name
    and overrides."""
    student = student or STUDENT
    over = kd_protocol(ipc, teacher, epochs, student) + (
        [f"evaluator.augment.scale=[{scale},1.0]"] if scale else []) + ([ENSEMBLE] if ensemble else []) + (
        pool_overrides("evaluator.extra_teacher_nets") if pool else [])
    name = f"kd{epochs or ''}{f's{scale}' if scale else ''}{'e' if ensemble else ''}{'p' if pool else ''}"
    return name + STUDENTS[student][1], over


def num_students(proto: str, ipc: int) -> int:
    """The default number of students: 4 under KD at ipc 1 (the students' spread is largest there), else 2."""
    return 4 if proto.startswith("kd") and ipc == 1 else 2


def table(args) -> None:
    rows, protocols = {}, {}
    for f in sorted((args.out / "eval").glob("*/results.json")):
        r = json.loads(f.read_text())
        r = r["evaluations"][-1] if "evaluations" in r else r  # the run record (ddrun.record), or an older result
        name = re.fullmatch(r"(.+)_ipc(\d+)_(.+)", f.parent.name)  # <method>_ipc<N>_<protocol>[_<more>]
        if name is None or name[1] not in METHODS:
            continue  # a folder of another layout
        m, ipc, proto = name[1], int(name[2]), name[3]
        rows.setdefault((proto, m), {})[ipc] = (r["acc_mean"], r["acc_std"], len(next(iter(r["per_net"].values()))))
        protocols[(proto, ipc)] = r.get("protocol_line") or r["protocol"]
    print("| protocol | method | " + " | ".join(f"ipc {i}" for i in IPCS) + " |")
    print("|---|---|" + "---|" * len(IPCS))
    for (proto, m), by_ipc in sorted(rows.items(), key=lambda kv: (kv[0][0], METHODS.index(kv[0][1]))):
        cells = [f"{by_ipc[i][0]:.2f} ± {by_ipc[i][1]:.2f} (n={by_ipc[i][2]})" if i in by_ipc else "-" for i in IPCS]
        print(f"| {proto} | {m} | " + " | ".join(cells) + " |")
    print()
    for (proto, ipc), line in sorted(protocols.items()):
        print(f"- {proto}, ipc {ipc}: {line}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", choices=["teacher", "buffer", "distill", "evaluate", "table"])
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "fm")
    p.add_argument("--data", default="data")
    p.add_argument("--ipc", default="1,10,50")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--num-eval", type=int, help="evaluate: students per S (default: 4 under KD at ipc 1, else 2; "
                   "another number is its own row, e.g. kdn8)")
    p.add_argument("--kd-epochs", type=int, help="evaluate: only the KD protocol with this many epochs (kd<N>)")
    p.add_argument("--kd-scale", type=float, help="evaluate: only the KD protocol with RandomResizedCrop scale "
                   "(this, 1) instead of (0.08, 1) (kds<this>)")
    p.add_argument("--kd-ensemble", action="store_true", help="evaluate: only the KD protocol with the teachers "
                   "ConvNet-BN-64 and ConvNet-BN-32 averaged (EDC's / G-VBSM's online ensemble; kde)")
    p.add_argument("--kd-student", choices=sorted(STUDENTS), help="evaluate: only the KD protocol with this "
                   "student (default convnet_bn_w32; resnet18_bn: the issue's default student, rows kdr18)")
    p.add_argument("--kd-pool", action="store_true", help="evaluate: only the KD protocol with the mean logits of "
                   "the pool of five (the teacher and `teacher --pool`'s four; kdp)")
    p.add_argument("--teacher", choices=sorted(TEACHERS), default="convnet_bn_w64", help="the one teacher of "
                   "recover, relabel and KD (default convnet_bn_w64; convnet_bn_w32: the pool's table)")
    p.add_argument("--pool", action="store_true", help="teacher: also the pool's four other backbones")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--protocols", default="kd,hard", help="evaluate: which of kd, hard (default both)")
    p.add_argument("--teacher-epochs", type=int, default=8, help="teacher: epochs of the SRe2L recipe (default 8)")
    p.add_argument("--sre2l-iterations", type=int, default=1000, help="distill: SRe2L's recover iterations at every "
                   "ipc (default: the reference's 1000)")
    p.add_argument("--gvbsm-iterations", type=int, help="distill: G-VBSM's recover iterations (default: its preset's "
                   "4000)")
    args = p.parse_args()
    args.ipc = [int(i) for i in args.ipc.split(",")]
    args.methods = args.methods.split(",")
    {"teacher": teacher, "buffer": buffer, "distill": distill, "evaluate": evaluate, "table": table}[args.step](args)


if __name__ == "__main__":
    main()

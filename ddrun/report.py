"""``ddrun report PATH...``: the table a paper prints, from run directories and sweeps.

Reads every run directory under the given paths (``ddrun distill`` and ``ddrun evaluate`` runs, single runs or
multiruns, local or from a SLURM sweep: a directory with ``.hydra/config.yaml`` and ``metrics.jsonl``), takes each
finished run's final evaluation, groups the runs by dataset x ipc x method x architecture and prints mean ± std over
seeds (each run contributes the mean over its ``num_eval`` networks; ``--pool nets`` pools every network instead, as
the DC reference's 100-model figures do) as a Markdown table; writes it as CSV, and draws accuracy vs iteration (per
method) and accuracy vs ipc as PNG. ``--compare`` adds the published figures shipped in ``ddrun/published.csv``
(each with its source). Every group states its evaluation protocol; groups whose runs used different protocols are
flagged.

Plain argparse rather than Hydra: the command takes a list of paths and a few flags, composes no config, and must
not create a run directory of its own.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ddrun.utils import DataError, DdrunError

PUBLISHED = Path(__file__).with_name("published.csv")


@dataclass
class Run:
    """One finished run: its identity, final accuracies per architecture and its accuracy curve."""

    path: Path
    command: str
    method: str
    dataset: str
    ipc: int | str
    seed: int
    iteration: int
    protocol: str
    accs: dict[str, list[float]]          # arch -> accuracy (%) of each evaluated network, final evaluation
    means: dict[str, float]               # arch -> mean over those networks
    curve: list[tuple[int, float]] = field(default_factory=list)  # (iteration, acc_mean) of every evaluation


def _protocol(cfg: dict) -> str:
    """The evaluation protocol of a run, from its config (the same line for distill and evaluate runs)."""
    ev = cfg.get("evaluator") or {}
    aug = (ev.get("augment") or {}).get("strategy", "none") if isinstance(ev.get("augment"), dict) else "none"
    archs = "/".join(ev.get("archs") or [ev.get("name", "convnet")])
    net = ev.get("net") if isinstance(ev.get("net"), dict) else None
    if net and not ev.get("archs"):  # the single evaluator's architecture settings (e.g. a narrow ConvNet)
        archs += "(" + ", ".join(f"{k} {v}" for k, v in net.items() if not str(k).startswith("_")) + ")"
    return (f"{archs} x{ev.get('num_eval')} nets, {ev.get('epochs')} epochs, SGD lr {ev.get('lr')} (x0.1 at half), "
            f"mom {ev.get('momentum')}, wd {ev.get('weight_decay')}, batch {ev.get('batch_train')}, aug {aug}"
            + ("" if ev.get("use_learned_lr", True) is False else ", learned lr when S has one"))


def _resolve_strategy(cfg: dict) -> dict:
    """``.hydra/config.yaml`` keeps interpolations: resolve the few the protocol line needs."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
    except Exception:  # noqa: BLE001 - an unresolvable key (e.g. an env var): use the raw values
        return cfg


def read_run(path: Path) -> Run | None:
    """The finished run in ``path``, or None when it has no final evaluation yet (still running, or killed).

    Raises:
        DataError: ``metrics.jsonl`` or the config cannot be parsed (names the file and line).
    """
    import yaml

    cfg_file, metrics = path / ".hydra" / "config.yaml", path / "metrics.jsonl"
    try:
        cfg = _resolve_strategy(yaml.safe_load(cfg_file.read_text()) or {})
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"cannot read {cfg_file}: {exc}") from None
    rows, lines = [], metrics.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):
                break  # a last line cut short by a kill: the run is not finished anyway
            raise DataError(f"{metrics}:{n}: not JSON") from None
    evals = [r for r in rows if "acc_mean" in r]
    command = "evaluate" if "synthetic" in cfg and "full" in cfg else "distill"
    if not evals:
        return None
    last = evals[-1]
    if command == "distill" and (int(last["iteration"]) != int(cfg.get("iterations", last["iteration"]))
                                 or not (path / "synthetic.pt").is_file()):
        return None
    per_net = last.get("per_net") or {(cfg.get("evaluator") or {}).get("name", "convnet"): [last["acc_mean"]]}
    accs = {a: [float(v) for v in vals] for a, vals in per_net.items()}
    return Run(path=path, command=command,
               method=str(last.get("method") or (cfg.get("preset") or {}).get("name", "?")),
               dataset=str(last.get("dataset") or (cfg.get("dataset") or {}).get("name", "?")),
               ipc=last.get("ipc", cfg.get("ipc", "?")), seed=int(cfg.get("seed", 0)), iteration=int(last["iteration"]),
               protocol=_protocol(cfg), accs=accs,
               means={a: statistics.fmean(v) for a, v in accs.items()},
               curve=[(int(r["iteration"]), float(r["acc_mean"])) for r in evals])


def find_runs(paths: list[str]) -> tuple[list[Run], list[Path]]:
    """Every finished run under ``paths`` (searched recursively), and the run directories without a final
    evaluation.

    Raises:
        DataError: a path does not exist, or holds no run directory at all.
    """
    runs, unfinished = [], []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{p}: no such file or directory")
        dirs = sorted({m.parent for m in ([p / "metrics.jsonl"] if (p / "metrics.jsonl").is_file() else [])} |
                      {m.parent for m in p.rglob("metrics.jsonl")})
        dirs = [d for d in dirs if (d / ".hydra" / "config.yaml").is_file()]
        if not dirs:
            raise DataError(f"{p}: no run directories (a folder with .hydra/config.yaml and metrics.jsonl) found")
        for d in dirs:
            run = read_run(d)
            (runs.append(run) if run is not None else unfinished.append(d))
    return runs, unfinished


def _ipc_key(ipc) -> tuple:
    return (1, 0) if ipc == "full" else (0, int(ipc)) if str(ipc).isdigit() else (2, str(ipc))


@dataclass
class Group:
    dataset: str
    ipc: int | str
    method: str
    arch: str
    values: list[float]      # one per run (seed) or per network (--pool nets)
    seeds: list[int]
    protocols: list[str]
    runs: list[Run]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.pstdev(self.values) if len(self.values) > 1 else 0.0


def group_runs(runs: list[Run], pool: str = "seeds") -> list[Group]:
    """Group by (dataset, ipc, method, arch), ordered as the papers' tables: dataset, ipc, then the baselines
    (random, herding, kcenter) before the distillation methods, the full-data upper bound last."""
    groups: dict[tuple, Group] = {}
    for r in runs:
        for arch, mean in r.means.items():
            key = (r.dataset, r.ipc, r.method, arch)
            g = groups.setdefault(key, Group(r.dataset, r.ipc, r.method, arch, [], [], [], []))
            g.values.extend(r.accs[arch] if pool == "nets" else [mean])
            g.seeds.append(r.seed)
            g.protocols.append(r.protocol)
            g.runs.append(r)
    order = {"random": 0, "herding": 1, "kcenter": 2}
    return sorted(groups.values(), key=lambda g: (g.dataset, _ipc_key(g.ipc), g.method == "full",
                                                  order.get(g.method, 3), g.method, g.arch))


def load_published(path: Path = PUBLISHED) -> dict[tuple, list[dict]]:
    """``(method, dataset, ipc, arch) -> [{acc_mean, acc_std, source}, ...]`` from ``published.csv``."""
    out: dict[tuple, list[dict]] = {}
    with open(path) as f:
        for row in csv.DictReader(line for line in f if not line.startswith("#")):
            ipc = int(row["ipc"]) if row["ipc"].isdigit() else row["ipc"]
            out.setdefault((row["method"], row["dataset"], ipc, row["arch"]), []).append(row)
    return out


def _published_cell(pub: dict, g: Group) -> str:
    return "; ".join(f"{p['acc_mean']}±{p['acc_std'] or '?'} [{p['source']}]"
                     for p in pub.get((g.method, g.dataset, g.ipc, g.arch), []))


def table(groups: list[Group], compare: bool = False, pool: str = "seeds") -> str:
    """The Markdown table, followed by the protocol of each group (and the sources, with ``compare``)."""
    pub = load_published() if compare else {}
    over = "networks" if pool == "nets" else "seeds"
    head = ["dataset", "ipc", "method", "arch", f"accuracy % (mean ± std over {over})", "n", "seeds"]
    if compare:
        head.append("published")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    protocols: dict[str, list[int]] = {}
    for i, g in enumerate(groups, 1):
        protos = sorted(set(g.protocols))
        marks = []
        for p in protos:
            protocols.setdefault(p, []).append(i)
            marks.append(str(list(protocols).index(p) + 1))
        flag = " (mixed protocols!)" if len(protos) > 1 else ""
        cells = [g.dataset, str(g.ipc), g.method, g.arch, f"{g.mean:.2f} ± {g.std:.2f}{flag} ^{','.join(marks)}",
                 str(len(g.values)), ",".join(map(str, sorted(g.seeds)))]
        if compare:
            cells.append(_published_cell(pub, g) or "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for n, p in enumerate(protocols, 1):
        lines.append(f"^{n} evaluation protocol: {p}")
    if compare:
        lines.append(f"published: {PUBLISHED.name} (ConvNet-3; sources: S3 DATM comparison table, S20 KIP-ConvNet "
                     "Table 1, S31 AutoPalette Table 1 as listed in PUBLISHED.md); different protocols and budgets, "
                     "compare with care")
    return "\n".join(lines)


def write_csv(groups: list[Group], path: Path, compare: bool = False) -> None:
    pub = load_published() if compare else {}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "ipc", "method", "arch", "acc_mean", "acc_std", "n", "seeds", "protocol",
                    "published", "runs"])
        for g in groups:
            w.writerow([g.dataset, g.ipc, g.method, g.arch, f"{g.mean:.4f}", f"{g.std:.4f}", len(g.values),
                        " ".join(map(str, sorted(g.seeds))), " | ".join(sorted(set(g.protocols))),
                        _published_cell(pub, g), " ".join(str(r.path) for r in g.runs)])


def plots(runs: list[Run], groups: list[Group], out: Path) -> list[Path]:
    """``acc_vs_iteration.png`` (one panel per dataset x ipc, one line per method: mean over seeds, band ± std) and
    ``acc_vs_ipc.png`` (one panel per dataset x arch, one line per method, error bars ± std); returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, axes, path: Path) -> Path:
        for ax in axes:
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    written = []
    curves: dict[tuple, dict[str, dict[int, list[float]]]] = {}
    for r in runs:
        if r.command != "distill" or len(r.curve) < 2:
            continue
        per_it = curves.setdefault((r.dataset, r.ipc), {}).setdefault(r.method, {})
        for it, acc in r.curve:
            per_it.setdefault(it, []).append(acc)
    if curves:
        keys = sorted(curves, key=lambda k: (k[0], _ipc_key(k[1])))
        fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for method, per_it in sorted(curves[key].items()):
                its = sorted(per_it)
                m = [statistics.fmean(per_it[i]) for i in its]
                s = [statistics.pstdev(per_it[i]) if len(per_it[i]) > 1 else 0.0 for i in its]
                ax.plot(its, m, marker="o", ms=3, label=method)
                ax.fill_between(its, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.2)
            ax.set(title=f"{key[0]}, ipc {key[1]}", xlabel="iteration")
        written.append(save(fig, axes[0], out / "acc_vs_iteration.png"))
    by_panel: dict[tuple, dict[str, list[Group]]] = {}
    for g in groups:
        if str(g.ipc).isdigit():
            by_panel.setdefault((g.dataset, g.arch), {}).setdefault(g.method, []).append(g)
    if by_panel:
        keys = sorted(by_panel)
        fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for method, gs in sorted(by_panel[key].items()):
                gs = sorted(gs, key=lambda g: int(g.ipc))
                ax.errorbar([int(g.ipc) for g in gs], [g.mean for g in gs], yerr=[g.std for g in gs], marker="o",
                            ms=4, capsize=3, label=method)
            ax.set(title=f"{key[0]} ({key[1]})", xlabel="images per class (ipc)", xscale="log")
        written.append(save(fig, axes[0], out / "acc_vs_ipc.png"))
    return written


def report(paths: list[str], out: str | None = None, compare: bool = False, pool: str = "seeds",
           plot: bool = True) -> dict:
    """Build the report of the runs under ``paths``; write ``report.csv`` and the PNGs into ``out`` (default: the
    first path when it is a directory). Returns ``{"table", "groups", "runs", "unfinished", "files"}``.

    Raises:
        DataError: missing paths, no run directories, no finished run, unreadable files.
    """
    runs, unfinished = find_runs(paths)
    if not runs:
        raise DataError(f"no finished run under {', '.join(paths)} ({len(unfinished)} without a final evaluation)")
    groups = group_runs(runs, pool)
    out_dir = Path(out) if out else (Path(paths[0]) if Path(paths[0]).is_dir() else Path("."))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(groups, out_dir / "report.csv", compare)
    files = [out_dir / "report.csv", *(plots(runs, groups, out_dir) if plot else [])]
    return {"table": table(groups, compare, pool), "groups": groups, "runs": runs, "unfinished": unfinished,
            "files": files}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ddrun report", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="run directories or folders holding them (e.g. a multirun folder)")
    parser.add_argument("--compare", action="store_true", help="add the published figures (ddrun/published.csv)")
    parser.add_argument("--pool", choices=["seeds", "nets"], default="seeds",
                        help="std over runs (seeds, default) or over every evaluated network (nets)")
    parser.add_argument("--out", help="folder for report.csv and the PNG plots (default: the first path)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        res = report(args.paths, args.out, args.compare, args.pool, not args.no_plots)
    except DdrunError as exc:
        print(f"ddrun report: error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(res["table"])
    if res["unfinished"]:
        print(f"\n{len(res['unfinished'])} run(s) without a final evaluation (running, stopped or failed), left out: "
              + ", ".join(str(p) for p in res["unfinished"]))
    print("\nwritten: " + ", ".join(str(p) for p in res["files"]))

"""``ddrun report PATH...``: the table a paper prints, from run records.

Reads the run record (``results.json``, :mod:`ddrun.record`) of every run directory under the given paths
(``ddrun distill`` and ``ddrun evaluate`` runs, single runs or multiruns, local or from a SLURM sweep) and nothing
else: no config is resolved, so a run folder from elsewhere cannot make the report print environment variables.
Every final evaluation of a run is one result; results are pooled into one row only when they agree in dataset,
ipc, method, architecture, command, evaluation protocol, test set, setting (every S-determining knob but the seed)
and iterations — runs that differ in any of these get separate rows, with a footnote naming what differs. Each row
gives mean ± std over seeds (each run contributes the mean over its networks; ``--pool nets`` pools every network,
as the DC reference's 100-model figures do) and, for distill runs, the best evaluation over the run (what MTT's
papers report), per architecture (from the evaluation rows of ``metrics.jsonl``: a cross-architecture run's pooled
best is no architecture's). Writes ``report.md`` and ``report.csv`` and draws accuracy vs iteration and accuracy vs
ipc as PNG; where it cannot write, it prints the table anyway and says so in one line. ``--compare`` adds the
published figures shipped in ``ddrun/published.csv`` (each with its source). ``--against METHOD`` adds each
row's difference to that method's row under the same protocol, network by network: students of the same seeds
(the same initialization and batches) on two sets differ far less than two sets' means do, so a paired difference
with the share of networks above says more than two overlapping ``mean ± std``. Runs of DD's poisoning
(``objective.attack``) get a column of their recorded attack success before and after S's steps.

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

from ddrun.record import FILENAME as RECORD_FILE
from ddrun.record import read as read_record
from ddrun.utils import DataError, DdrunError

PUBLISHED = Path(__file__).with_name("published.csv")
BASELINES = {"random": 0, "herding": 1, "kcenter": 2}
ATTACK = ("dd_attack_before", "dd_attack_success")  # DD's poisoning: % of class a read as b, before / after S's steps


@dataclass
class Result:
    """One final evaluation of one run (a run evaluated under two protocols gives two results)."""

    path: Path
    command: str
    method: str
    dataset: str
    ipc: int | str
    seed: int | None
    iterations: int | None
    setting_hash: str | None
    setting: dict
    protocol: dict                        # protocol fields without the test set
    protocol_line: str
    test_images: int | None
    accs: dict[str, list[float]]          # arch -> accuracy (%) of each evaluated network
    best: dict[str, dict] = field(default_factory=dict)   # arch -> {"iteration", "acc_mean"}: its best evaluation
    curve: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # arch -> (iteration, its mean accuracy)
    run_seed: int | None = None           # the record's own seed (an evaluate's student seed; a distill's = seed)
    extra: dict[str, float] = field(default_factory=dict)  # the evaluation's ATTACK metrics (%), when recorded

    def key(self, arch: str) -> tuple:
        """What must agree for two results to be seeds of one experiment."""
        return (self.dataset, str(self.ipc), self.method, arch, self.command, self.protocol_line, self.test_images,
                self.setting_hash, self.iterations)


def _evaluation_rows(path: Path) -> list[dict] | None:
    """The evaluation rows (with ``acc_mean``) of ``path/metrics.jsonl``; None when it cannot be read."""
    try:
        lines = (path / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    rows = []
    for line in lines:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and "acc_mean" in r and "iteration" in r:
            rows.append(r)
    return rows


def _curves(rows: list[dict], protocol_line: str, archs: list[str]) -> dict[str, list[tuple[int, float]]]:
    """Per architecture, (iteration, its mean accuracy) of every evaluation of the run under ``protocol_line``:
    the row's ``acc_mean`` for a single architecture, the mean of the row's ``per_net[arch]`` for a
    cross-architecture evaluation (its ``acc_mean`` pools the architectures)."""
    curves: dict[str, list[tuple[int, float]]] = {a: [] for a in archs}
    for r in rows:
        if r.get("protocol", protocol_line) != protocol_line:
            continue
        per_net = r.get("per_net") or {}
        for a in archs:
            if len(archs) == 1:
                curves[a].append((int(r["iteration"]), float(r["acc_mean"])))
            elif per_net.get(a):
                curves[a].append((int(r["iteration"]), statistics.fmean(float(v) for v in per_net[a])))
    return curves


def _bests(curves: dict[str, list[tuple[int, float]]], rows: list[dict] | None, rec: dict, line: str) -> dict:
    """arch -> ``{"iteration", "acc_mean"}`` of its best evaluation over the run (from its own curve). Without
    ``metrics.jsonl``, the record's ``best`` for a single-architecture evaluation under the same protocol (a
    cross-architecture record's best pools the architectures: no per-architecture best then)."""
    if rows is None:
        best = rec.get("best") or {}
        return {a: best for a in curves} if len(curves) == 1 and best.get("protocol_line") == line else {}
    out = {}
    for a, curve in curves.items():
        if curve:
            it, acc = max(curve, key=lambda p: p[1])
            out[a] = {"iteration": it, "acc_mean": acc}
    return out


def results_of(path: Path) -> list[Result]:
    """The results recorded in ``path/results.json``. Raises DataError for an unreadable record."""
    rec = read_record(path)
    source = rec.get("source") or {}
    distilled = rec.get("command", "distill") == "distill"
    seed = source.get("seed", rec.get("seed")) if not distilled else rec.get("seed")
    rows = _evaluation_rows(path) if distilled else []
    out = []
    for ev in rec["evaluations"]:
        protocol = {k: v for k, v in ev.get("protocol", {}).items() if k != "test"}
        line = ev.get("protocol_line", "")
        test = (ev.get("protocol") or {}).get("test") or {}
        accs = {a: [float(v) for v in accs] for a, accs in (ev.get("per_net") or {}).items()}
        curves = _curves(rows or [], line, list(accs)) if distilled else {}
        setting_hash = rec.get("setting_hash") or (rec.get("setting") or {}).get("source.setting_hash")
        out.append(Result(path=path, command=str(rec.get("command", "distill")), method=str(rec.get("method")),
                          dataset=str(rec.get("dataset")), ipc=rec.get("ipc"), seed=seed,
                          iterations=rec.get("iterations"), setting_hash=setting_hash,
                          setting=source.get("setting") or rec.get("setting") or {}, protocol=protocol,
                          protocol_line=line, test_images=test.get("images"), accs=accs,
                          best=_bests(curves, rows, rec, line) if distilled else {}, curve=curves,
                          run_seed=rec.get("seed"),
                          extra={k: float(v) for k, v in (ev.get("extra") or {}).items()
                                 if k in ATTACK and isinstance(v, (int, float)) and not isinstance(v, bool)}))
    return out


RUN_FILES = (RECORD_FILE, "metrics.jsonl", "distill.log", "evaluate.log")  # any of them marks a run directory


def find_results(paths: list[str]) -> tuple[list[Result], list[Path]]:
    """Every result under ``paths`` (searched recursively), and the run directories without a run record
    (running, stopped or failed).

    Raises:
        DataError: a path does not exist, or holds no run directory at all.
    """
    results, unfinished = [], []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{p}: no such file or directory")
        # a job that failed before its first metrics row left only its log (``distill.log``, ``evaluate.log``)
        dirs = {m.parent for name in RUN_FILES for m in p.rglob(name)}
        dirs |= {p} if any((p / name).is_file() for name in RUN_FILES) else set()
        dirs = {d for d in dirs if "archive" not in d.relative_to(p).parts}
        if not dirs:
            raise DataError(f"{p}: no run directories (a folder with results.json or metrics.jsonl) found")
        for d in sorted(dirs):
            if (d / RECORD_FILE).is_file():
                results.extend(results_of(d))
            else:
                unfinished.append(d)
    return results, unfinished


def _ipc_key(ipc) -> tuple:
    return (1, 0) if ipc == "full" else (0, int(ipc)) if str(ipc).isdigit() else (2, str(ipc))


@dataclass
class Group:
    """One row: results that agree in everything but the seed (``Result.key``)."""

    dataset: str
    ipc: int | str
    method: str
    arch: str
    results: list[Result]
    values: list[float]      # one per seed or per network (--pool nets)
    notes: list[str] = field(default_factory=list)   # seeds found in more than one run, and what was done

    @property
    def first(self) -> Result:
        return self.results[0]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.pstdev(self.values) if len(self.values) > 1 else 0.0

    @property
    def n(self) -> int:
        """Runs counted: one per seed (results without a seed one each)."""
        return len(self.seeds) + sum(r.seed is None for r in self.results)

    @property
    def seeds(self) -> list:
        return sorted({r.seed for r in self.results if r.seed is not None})

    @property
    def best(self) -> tuple[float, float] | None:
        """Mean and std over the runs of this architecture's best evaluation (None: no distill run has one)."""
        return _mean_std([r.best[self.arch]["acc_mean"] for r in self.results if self.arch in r.best])

    @property
    def attack(self) -> list[tuple[float, float] | None]:
        """Mean and std over the runs of each of DD's poisoning metrics (:data:`ATTACK`; None where no run has it)."""
        return [_mean_std([r.extra[k] for r in self.results if k in r.extra]) for k in ATTACK]


def _mean_std(values: list[float]) -> tuple[float, float] | None:
    """Mean and population std of ``values`` (None when empty)."""
    if not values:
        return None
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def _attack_cell(g: Group) -> str:
    """``before → after`` (mean ± std over the row's runs, %) of DD's poisoning metrics, with the classes when the
    setting records them; "–" for a row without them."""
    before, after = g.attack
    if after is None:
        return "–"
    pair = [g.first.setting.get(f"objective.attack.{k}") for k in ("source", "target")]
    classes = f" (class {pair[0]} as {pair[1]})" if None not in pair else ""
    start = "" if before is None else f"{before[0]:.2f} ± {before[1]:.2f} → "
    return f"{start}{after[0]:.2f} ± {after[1]:.2f}{classes}"


def _seed_values(runs: list[tuple[Result, list[float]]], pool: str) -> tuple[list[Result], list[float], list[str]]:
    """The results, values and notes of one row: each seed counts once. Runs of one seed with the same record seed
    are repeats (one run copied or rerun elsewhere): the first is kept. Runs of one seed with different record seeds
    (``ddrun evaluate`` of one S with other student seeds) are more networks of that seed: pooled into its one
    value (``pool="seeds"``) or all kept (``pool="nets"``). A result without a seed stands alone."""
    by_seed: dict = {}
    for r, accs in runs:
        by_seed.setdefault(r.seed if r.seed is not None else id(r), []).append((r, accs))
    kept, values, notes = [], [], []
    for seed, group in by_seed.items():
        unique: dict = {}
        for r, accs in group:
            unique.setdefault(r.run_seed, (r, accs))
        if len(unique) < len(group):
            dropped = [str(r.path) for r, _ in group if unique[r.run_seed][0] is not r]
            first = [str(r.path) for r, _ in unique.values()]
            notes.append(f"seed {seed} repeated in {', '.join(dropped)}: counted once ({', '.join(first)})")
        nets = [a for _, accs in unique.values() for a in accs]
        if len(unique) > 1:
            kept_how = "every network kept" if pool == "nets" else f"their {len(nets)} networks pooled into one value"
            notes.append(f"seed {seed}: {len(unique)} evaluations of one set (student seeds "
                         f"{', '.join(map(str, unique))}), {kept_how}")
        kept += [r for r, _ in unique.values()]
        values += nets if pool == "nets" else [statistics.fmean(nets)]
    return kept, values, notes


def group_results(results: list[Result], pool: str = "seeds") -> list[Group]:
    """Group by :meth:`Result.key` (each seed once: :func:`_seed_values`), ordered as the papers' tables:
    dataset, ipc, the baselines (random, herding, kcenter) before the distillation methods, the full-data upper
    bound last."""
    runs: dict[tuple, list[tuple[Result, list[float]]]] = {}
    for r in results:
        for arch, accs in r.accs.items():
            if accs:
                runs.setdefault(r.key(arch), []).append((r, accs))
    groups = []
    for key, members in runs.items():
        r, arch = members[0][0], key[3]
        kept, values, notes = _seed_values(members, pool)
        groups.append(Group(r.dataset, r.ipc, r.method, arch, kept, values, notes))
    return sorted(groups, key=lambda g: (g.dataset, _ipc_key(g.ipc), g.method == "full", BASELINES.get(g.method, 3),
                                         g.method, g.arch, g.first.command != "distill", g.first.iterations or 0))


def paired(g: Group, base: Group) -> list[float]:
    """Per-network differences ``g - base`` (points) over the networks both rows trained from the same seeds: a
    result of ``g`` and one of ``base`` with the same seed and record seed (so the same student seeds, e.g. S's
    seed 0 evaluated with student seed 0), network i against network i for the networks both trained (network
    i's seed is ``derive_seed(seed, 104729, i)`` whatever ``num_eval`` is, so 8 students pair their first 4 with
    another row's 4). Empty when no result pairs up."""
    others = {(r.seed, r.run_seed): r.accs.get(base.arch, []) for r in base.results}
    out = []
    for r in g.results:
        mine, theirs = r.accs.get(g.arch, []), others.get((r.seed, r.run_seed), [])
        out += [a - b for a, b in zip(mine, theirs)]
    return out


def _protocol_but_count(r: Result) -> tuple:
    """What two results' evaluations must share for their networks to pair: every protocol field but the number
    of networks (``num_eval``), and the test set."""
    return tuple(sorted((k, repr(v)) for k, v in r.protocol.items() if k != "num_eval")), r.test_images


def paired_to(g: Group, groups: list[Group], against: str) -> list[float]:
    """:func:`paired` of ``g`` against the row of method ``against`` with the same dataset, ipc, architecture and
    evaluation protocol but for the number of networks (the first such row whose networks pair up with ``g``'s);
    empty when there is none, or ``g`` is that row."""
    for b in groups:
        if b is not g and b.method == against and (b.dataset, str(b.ipc), b.arch, _protocol_but_count(b.first)) == \
                (g.dataset, str(g.ipc), g.arch, _protocol_but_count(g.first)):
            d = paired(g, b)
            if d:
                return d
    return []


def _paired_cell(g: Group, groups: list[Group], against: str) -> str:
    """``mean ± std (k/n above)`` of :func:`paired_to`, or "–"."""
    d = paired_to(g, groups, against)
    if not d:
        return "–"
    spread = statistics.pstdev(d) if len(d) > 1 else 0.0
    return f"{statistics.fmean(d):+.2f} ± {spread:.2f} ({sum(x > 0 for x in d)}/{len(d)} above)"


def differences(a: Result, b: Result) -> list[str]:
    """What distinguishes result ``b`` from result ``a`` (same dataset, ipc, method, architecture)."""
    diff = []
    if a.command != b.command:
        diff.append(f"{b.command} of a saved set" if b.command == "evaluate" else f"command {b.command}")
    if a.iterations != b.iterations:
        diff.append(f"iterations {a.iterations} vs {b.iterations}")
    if a.test_images != b.test_images:
        diff.append(f"test images {a.test_images} vs {b.test_images}")
    for k in sorted(set(a.protocol) | set(b.protocol)):
        if a.protocol.get(k) != b.protocol.get(k):
            diff.append(f"evaluator {k} {a.protocol.get(k)} vs {b.protocol.get(k)}")
    for k in sorted(set(a.setting) | set(b.setting)):
        if a.setting.get(k) != b.setting.get(k) and not k.startswith("source."):
            diff.append(f"{k} {a.setting.get(k)} vs {b.setting.get(k)}")
    if not diff and a.setting_hash != b.setting_hash:
        diff.append("the distillation settings (setting hash " f"{a.setting_hash} vs {b.setting_hash})")
    return diff


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


def table(groups: list[Group], compare: bool = False, pool: str = "seeds", against: str | None = None) -> str:
    """The Markdown table, then the protocol of each row (``^n``) and what distinguishes rows of one method
    (``[n]``), and the sources with ``compare``; with ``against`` a column of each row's paired difference to that
    method's row (:func:`paired`)."""
    pub = load_published() if compare else {}
    over = "networks" if pool == "nets" else "seeds"
    attack = any(r.extra for g in groups for r in g.results)  # a column only for reports that hold DD's poisoning
    head = ["dataset", "ipc", "method", "arch", f"accuracy % (mean ± std over {over})", "n", "seeds", "iterations",
            "best % (over evaluations)"] + (["attack success % (before → after S's steps)"] if attack else []) \
        + (["published"] if compare else []) \
        + ([f"vs {against}, paired by student seed (points: mean ± std, networks above)"] if against else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    protocols: dict[str, int] = {}
    notes: list[str] = []
    for i, g in enumerate(groups, 1):
        mark = protocols.setdefault(g.first.protocol_line, len(protocols) + 1)
        family = [h for h in groups[:i - 1] if (h.dataset, str(h.ipc), h.method, h.arch) ==
                  (g.dataset, str(g.ipc), g.method, g.arch)]
        note = ""
        if family:
            notes.append(f"[{len(notes) + 1}] row {i} differs from row {groups.index(family[0]) + 1} in: "
                         f"{'; '.join(differences(family[0].first, g.first)) or 'nothing recorded'}")
            note = f" [{len(notes)}]"
        for text in g.notes:
            notes.append(f"[{len(notes) + 1}] row {i}: {text}")
            note += f" [{len(notes)}]"
        label = g.method + (" (evaluate)" if g.first.command == "evaluate" else "")
        best = g.best
        cells = [g.dataset, str(g.ipc), label + note, g.arch, f"{g.mean:.2f} ± {g.std:.2f} ^{mark}",
                 str(g.n), ",".join(map(str, g.seeds)) or "–",
                 "–" if g.first.iterations is None else str(g.first.iterations),
                 "–" if best is None else f"{best[0]:.2f} ± {best[1]:.2f}"] + ([_attack_cell(g)] if attack else [])
        if compare:
            cells.append(_published_cell(pub, g) or "–")
        if against:
            cells.append(_paired_cell(g, groups, against))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"^{n} evaluation protocol: {p}" for p, n in protocols.items()]
    lines += notes
    if compare:
        lines.append(f"published: {PUBLISHED.name} (ConvNet-3; sources: S3 DATM comparison table, S20 KIP-ConvNet "
                     "Table 1, S31 AutoPalette Table 1 as listed in PUBLISHED.md); different protocols and budgets, "
                     "compare with care")
    return "\n".join(lines)


def write_csv(groups: list[Group], path: Path, compare: bool = False, against: str | None = None) -> None:
    """``report.csv``: one line per row of :func:`table` (with ``against``, a last column of its paired cell)."""
    pub = load_published() if compare else {}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "ipc", "method", "arch", "command", "acc_mean", "acc_std", "n", "seeds", "iterations",
                    "best_mean", "protocol", "test_images", "setting_hash", "published", "runs",
                    *(f"{k}_mean" for k in ATTACK), *([f"vs_{against}_paired"] if against else [])])
        for g in groups:
            best = g.best
            w.writerow([g.dataset, g.ipc, g.method, g.arch, g.first.command, f"{g.mean:.4f}", f"{g.std:.4f}",
                        g.n, " ".join(map(str, g.seeds)), "" if g.first.iterations is None else g.first.iterations,
                        "" if best is None else f"{best[0]:.4f}", g.first.protocol_line, g.first.test_images,
                        g.first.setting_hash, _published_cell(pub, g), " ".join(str(r.path) for r in g.results),
                        *("" if a is None else f"{a[0]:.4f}" for a in g.attack),
                        *([_paired_cell(g, groups, against)] if against else [])])


def _save_figure(fig, axes, path: Path) -> Path:
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(results: list[Result], out: Path) -> Path | None:
    """``acc_vs_iteration.png``: one panel per dataset x ipc, one line per method (per method and architecture for
    a cross-architecture evaluation; mean over seeds, band ± std)."""
    import matplotlib.pyplot as plt

    curves: dict[tuple, dict[str, dict[int, list[float]]]] = {}
    for r in results:
        for arch, curve in r.curve.items():
            if len(curve) < 2:
                continue
            label = r.method if len(r.curve) == 1 else f"{r.method} ({arch})"
            per_it = curves.setdefault((r.dataset, r.ipc), {}).setdefault(label, {})
            for it, acc in curve:
                per_it.setdefault(it, []).append(acc)
    if not curves:
        return None
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
    return _save_figure(fig, axes[0], out / "acc_vs_iteration.png")


def plot_ipc(groups: list[Group], out: Path) -> Path | None:
    """``acc_vs_ipc.png``: one panel per dataset x arch, one line per method and protocol, error bars ± std."""
    import matplotlib.pyplot as plt

    panels: dict[tuple, dict[str, list[Group]]] = {}
    for g in groups:
        if str(g.ipc).isdigit():
            label = g.method + ("" if g.first.command == "distill" else " (evaluate)")
            panels.setdefault((g.dataset, g.arch), {}).setdefault(label, []).append(g)
    if not panels:
        return None
    keys = sorted(panels)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, gs in sorted(panels[key].items()):
            gs = sorted(gs, key=lambda g: int(g.ipc))
            ax.errorbar([int(g.ipc) for g in gs], [g.mean for g in gs], yerr=[g.std for g in gs], marker="o",
                        ms=4, capsize=3, label=label)
        ax.set(title=f"{key[0]} ({key[1]})", xlabel="images per class (ipc)", xscale="log")
    return _save_figure(fig, axes[0], out / "acc_vs_ipc.png")


def report(paths: list[str], out: str | None = None, compare: bool = False, pool: str = "seeds",
           plot: bool = True, against: str | None = None) -> dict:
    """Build the report of the runs under ``paths``; write ``report.md``, ``report.csv`` and the PNGs into ``out``
    (default: the first path when it is a directory). Returns ``{"table", "groups", "results", "unfinished",
    "files", "not_written"}``: ``not_written`` says where files could not be written (the table is complete).

    Raises:
        DataError: missing paths, no run directories, no finished run, unreadable records; a ``report.md`` in
            ``out`` that ddrun report did not write (it is kept); ``against`` names no row's method.
    """
    results, unfinished = find_results(paths)
    if not results:
        raise DataError(f"no finished run under {', '.join(paths)} ({len(unfinished)} without a run record)")
    groups = group_results(results, pool)
    if against is not None and against not in {g.method for g in groups}:
        raise DataError(f"--against {against}: no row of that method; the methods are "
                        f"{sorted({g.method for g in groups})}")
    text = table(groups, compare, pool, against)
    out_dir = Path(out) if out else (Path(paths[0]) if Path(paths[0]).is_dir() else Path("."))
    files, not_written = [], None
    theirs = out_dir / "report.md"
    if theirs.is_file() and not theirs.read_text(errors="replace").startswith("| dataset | ipc |"):
        raise DataError(f"{theirs} exists and was not written by ddrun report: pass --out <another folder>")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.md").write_text(text + "\n")
        write_csv(groups, out_dir / "report.csv", compare, against)
        files = [out_dir / "report.md", out_dir / "report.csv"]
        if plot:
            import matplotlib

            matplotlib.use("Agg")
            files += [f for f in (plot_curves(results, out_dir), plot_ipc(groups, out_dir)) if f is not None]
    except OSError as exc:
        not_written = f"could not write the report files to {out_dir} ({exc.strerror or exc}); pass --out DIR"
    return {"table": text, "groups": groups, "results": results, "unfinished": unfinished, "files": files,
            "not_written": not_written}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ddrun report", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="run directories or folders holding them (e.g. a multirun folder)")
    parser.add_argument("--compare", action="store_true", help="add the published figures (ddrun/published.csv)")
    parser.add_argument("--pool", choices=["seeds", "nets"], default="seeds",
                        help="std over runs (seeds, default) or over every evaluated network (nets)")
    parser.add_argument("--out", help="folder for report.md, report.csv and the PNG plots (default: the first path)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--against", metavar="METHOD",
                        help="add each row's difference to METHOD's row of the same protocol, network by network "
                             "(students of the same seeds), e.g. --against random")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        res = report(args.paths, args.out, args.compare, args.pool, not args.no_plots, args.against)
    except DdrunError as exc:
        print(f"ddrun report: error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(res["table"])
    if res["unfinished"]:
        print(f"\n{len(res['unfinished'])} run(s) without a run record (running, stopped or failed), left out: "
              + ", ".join(str(p) for p in res["unfinished"]))
    if res["not_written"]:
        print(f"\nddrun report: {res['not_written']}", file=sys.stderr)
    else:
        print("\nwritten: " + ", ".join(str(p) for p in res["files"]))

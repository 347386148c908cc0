"""``ddrun distill``: the distillation loop.

    S = init(T, ipc)
    for it in range(start, iterations):
        fetched = fetcher.fetch(it)                         # fresh | fixed | expert segment | pool member | teacher
        for step in range(schedule.steps):                  # DC/DSA: several updates of S per network
            if step: fetched = schedule.between(fetched, S, T, g)   # train the network on S in between
            loss = objective(param.decode(S), T, fetched, it, g)
            optimizer_S.step()                              # images (and learned lr / labels)
        scheduler_S.step(); fetcher.release(fetched, S, T, g)
        every eval_every: evaluator(S), image grid, checkpoint
    for stage in stages: S = stage(S, T, seed)              # after distillation (e.g. relabel with a teacher)
    evaluator(S) (final); save S

Nothing here is method-specific: every part is built with ``hydra.utils.instantiate`` from the config groups and
satisfies a contract of :mod:`ddrun.contracts`. All randomness of iteration ``it`` comes from a generator seeded
by ``(seed, it)``, so a run repeats exactly from ``seed`` and a resumed run continues as if it had never stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ddrun import speed
from ddrun.checkpoint import RunLock, RunState, StopSignals, set_rng_state
from ddrun.contracts import Parametrization
from ddrun.utils import ConfigError, DdrunError, build, command_errors, derive_seed, resolve_device, seed_everything

log = logging.getLogger("ddrun.distill")


def _leaves(node, prefix: str = ""):
    """``(dotted key, raw value)`` of every leaf of a plain (unresolved) config container."""
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _leaves(v, key + ".")
        else:
            yield key, v


def check_per_ipc_tables(cfg: DictConfig) -> None:
    """The one check of the presets' per-ipc tables. A preset sets a value that the paper gives per ipc as
    ``${oc.select:<table>.ipc${ipc}.<field>,???}``: when the table has no entry for this ipc the value is ``???``
    (OmegaConf's "must be given"), and this raises a one-line ConfigError naming the key, the table's ipc values
    and how to set the key by hand."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    for key, value in _leaves(raw):
        if not (isinstance(value, str) and "ipc${ipc}" in value and value.replace(" ", "").endswith(",???}")):
            continue
        if OmegaConf.select(cfg, key, throw_on_missing=False) not in (None, "???"):
            continue
        table = value[value.index(":") + 1:value.index(".ipc${ipc}")]
        known = ", ".join(k.removeprefix("ipc") for k in (OmegaConf.select(cfg, table) or {}))
        raise ConfigError(f"{key} is not set: method={cfg.preset.name} has no value for ipc={cfg.ipc} in its "
                          f"table {table} (it defines ipc {known}); pass {key}=N")


def has_objective(cfg: DictConfig) -> bool:
    """Whether the method optimizes S (the coreset baselines select an objective of none)."""
    return OmegaConf.select(cfg, "objective._target_") is not None


def validate(cfg: DictConfig) -> None:
    """Check the top-level knobs before any work; raise a one-line ConfigError naming the key."""
    if int(cfg.ipc) < 1:
        raise ConfigError(f"ipc={cfg.ipc}: must be >= 1 (images per class)")
    if int(cfg.iterations) < 0:
        raise ConfigError(f"iterations={cfg.iterations}: must be >= 0 (0 evaluates the initialization)")
    if int(cfg.eval_every) < 1:
        raise ConfigError(f"eval_every={cfg.eval_every}: must be >= 1")
    if int(cfg.iterations) > 0 and not has_objective(cfg):
        init = str(OmegaConf.select(cfg, "init._target_", default="real")).rsplit(".", 1)[-1]
        raise ConfigError(f"method={cfg.preset.name} is a baseline (ipc real images chosen by init={init}, not "
                          f"optimized): it takes iterations=0, not {cfg.iterations}; to distill from that "
                          f"initialization use `init={init} method=dm` (or another method)")
    check_per_ipc_tables(cfg)


def config_hash(cfg: DictConfig) -> str:
    """A short hash of everything that determines S (not paths, logging or evaluation settings)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    for k in ("paths", "logger", "evaluator", "eval_every", "eval_at_start", "log_every", "iterations", "resume",
              "device", "hydra", "checkpoint_every", "speed", "deterministic"):
        c.pop(k, None)
    # sorted keys: the hash must not depend on the order in which the config files list them
    return hashlib.sha1(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Distillation:
    """One run of the loop (module doc) in ``run_dir``: its components, its :class:`~ddrun.checkpoint.RunState`,
    and the steps of the loop as methods. Built from ``cfg``, restored from ``checkpoint.pt`` when the directory
    has one and ``resume`` is true."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        t0 = time.perf_counter()
        self.cfg, self.run_dir = cfg, run_dir
        self.device, self.seed = resolve_device(cfg.device), int(cfg.seed)
        self.iterations, self.eval_every = int(cfg.iterations), int(cfg.eval_every)
        seed_everything(self.seed)
        speed.configure(cfg.get("speed"), bool(cfg.get("deterministic", False)))
        self.chash = config_hash(cfg)
        self.ckpt_path = run_dir / "checkpoint.pt"
        restored = RunState.load(self.ckpt_path) if cfg.resume else None
        self.state, ckpt = restored if restored is not None else (RunState(), None)
        self.resumed = ckpt is not None
        self._check_resumable(ckpt)
        self._build(ckpt)
        if ckpt is not None:
            try:
                self._restore(ckpt)
            except BaseException:
                self.tracker.close()
                raise
            log.info("resuming from %s at iteration %d (restored in %.2f s)", ckpt["path"], self.state.iteration,
                     time.perf_counter() - t0)

    def _check_resumable(self, ckpt: dict | None) -> None:
        if ckpt is None:
            return
        if ckpt.get("config_hash") != self.chash:
            raise ConfigError(f"{ckpt['path']} was written by a run with another configuration (hash "
                              f"{ckpt.get('config_hash')} != {self.chash}); use another run directory or resume=false")
        if self.state.iteration > self.iterations or (self.state.stages_done and
                                                       self.state.iteration < self.iterations):
            raise ConfigError(f"{ckpt['path']} is at iteration {self.state.iteration}"
                              f"{' with its stages done' if self.state.stages_done else ''}, which "
                              f"iterations={self.iterations} does not continue: pass iterations="
                              f"{self.state.iteration}, another run directory, or resume=false")

    def _build(self, ckpt: dict | None) -> None:
        """Build every component from the config (S from the checkpoint when resuming: the initializer, e.g.
        K-Center's network training, is not run again)."""
        from ddrun.synthetic import SyntheticSet
        from ddrun.tracking import Tracker

        cfg = self.cfg
        self.real = build(cfg.dataset).to(self.device)
        if ckpt is None:
            self.syn = build(cfg.init)(self.real, int(cfg.ipc), torch.Generator().manual_seed(derive_seed(self.seed, 1)))
        else:
            self.syn = SyntheticSet.from_state(ckpt["syn"])
        real = self.real
        self.syn.meta.update(dataset=real.name, num_classes=real.num_classes, channels=real.channels,
                             im_size=list(real.im_size), mean=list(real.mean), std=list(real.std),
                             zca=real.zca is not None, ipc=int(cfg.ipc), method=str(cfg.preset.name),
                             config_hash=self.chash)
        self.syn = self.syn.to(self.device)
        self.param: Parametrization = build(cfg.parametrization)
        self.syn.meta.update(self.param.describe(self.syn))
        self.objective = build(cfg.objective) if has_objective(cfg) else None
        self.fetcher = build(cfg.fetcher)(real=real, device=self.device, seed=self.seed) if self.objective else None
        self.schedule = build(cfg.schedule)
        self.optimizer = self.scheduler = None
        if self.objective is not None:
            self.objective.prepare(self.syn, real)
            self.optimizer = build(cfg.syn_optimizer)(self.objective.param_groups(self.syn), lr=self.objective.lr_img)
            if cfg.get("syn_scheduler") is not None:
                self.scheduler = build(cfg.syn_scheduler)(self.optimizer)
        self.stages = {name: build(node) for name, node in (cfg.get("stages") or {}).items()}
        self.evaluator = build(cfg.evaluator)
        if self.evaluator.num_eval < 1:  # evaluator.num_eval=0: distill only
            self.evaluator = None
        self.tracker = Tracker(self.run_dir, OmegaConf.to_container(cfg, resolve=True), resume_id=self.state.wandb_id,
                               **OmegaConf.to_container(cfg.logger, resolve=True))
        self.state.wandb_id = self.tracker.run_id

    def _restore(self, ckpt: dict) -> None:
        """Component states from the checkpoint, after they are built (``prepare`` switched on what S learns)."""
        self.syn.load_state(ckpt["syn"])
        for name, part in (("fetcher", self.fetcher), ("objective", self.objective), ("optimizer", self.optimizer),
                           ("scheduler", self.scheduler)):
            if part is not None and ckpt.get(name):
                part.load_state_dict(ckpt[name])
        self.tracker.restore(self.state.metrics)
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])

    # --- the loop -----------------------------------------------------------------------------------------
    def run(self, stop: StopSignals) -> dict:
        """The loop: iterations, then the stages, then the final evaluation; returns the final result."""
        from tqdm.auto import tqdm

        if self.evaluator is not None:
            log.info("evaluation protocol: %s", self.evaluator.protocol())
        bar = tqdm(range(self.state.iteration, self.iterations + 1), initial=self.state.iteration,
                   total=self.iterations + 1, desc="distill", disable=None)
        try:
            for it in bar:
                if it == self.iterations:
                    self.run_stages(stop)
                self.boundary(it, stop)
                if it == self.iterations:
                    break
                self.step(it)
                bar.set_postfix(loss=f"{self.state.loss:.4g}", acc=self._last_acc())
            self.syn.meta["iteration"] = self.iterations
            self.syn.save(self.run_dir / "synthetic.pt")
        finally:
            bar.close()
            self.tracker.close()
        out = {"run_dir": str(self.run_dir), "synthetic": str(self.run_dir / "synthetic.pt")}
        return {**out, **(self.state.result or {})}

    def _last_acc(self) -> str | None:
        r = self.state.result
        return None if r is None or "acc_mean" not in r else f"{r['acc_mean']:.2f}"

    def is_eval_step(self, it: int) -> bool:
        return it == self.iterations or (it % self.eval_every == 0 and (it > 0 or bool(self.cfg.eval_at_start)))

    def boundary(self, it: int, stop: StopSignals) -> None:
        """Between iterations ``it - 1`` and ``it``: checkpoint when due, act on a stop signal, evaluate when
        due."""
        st = self.state
        pending_eval = self.is_eval_step(it) and st.evaluated_at != it
        first = it == 0 and not self.resumed and st.saved_at is None
        if pending_eval or first or (it > st.saved_at and it % int(self.cfg.checkpoint_every) == 0):
            self.checkpoint(it)
        if stop.pending is not None:  # a stop signal arrived: save the state of `it`, then stop
            if st.saved_at != it:
                self.checkpoint(it)
            stop.stop(it, self.ckpt_path)
        if pending_eval:
            with stop.interruptible(it, self.ckpt_path):  # the checkpoint is current: a signal stops at once
                st.result = self.evaluate(it)
            st.evaluated_at = it
            self.checkpoint(it)

    def step(self, it: int) -> None:
        """Iteration ``it``: fetch a network, ``schedule.steps`` updates of S, then the checks."""
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(derive_seed(self.seed, 2, it))
        fetched = self.fetcher.fetch(it)
        for step in range(self.schedule.steps):
            if step > 0:
                fetched = self.schedule.between(fetched, self.syn, self.real, g)
            with speed.autocast(self.device):
                loss = self.objective(self.param.decode(self.syn), self.real, fetched, it, g)
            if not torch.isfinite(loss):
                raise DdrunError(f"the loss became {loss.item()} at iteration {it}; stopped, the last good "
                                 f"checkpoint (iteration {self.state.saved_at}) is kept at {self.ckpt_path}")
            if not self.objective.accepts(loss):
                continue
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.fetcher.release(fetched, self.param.decode(self.syn), self.real, g)
        self.objective.check(self.syn, it)
        st = self.state
        st.loss, st.iteration = loss.item(), it + 1
        st.seconds += time.perf_counter() - t0
        bad = [name for name, p in self.syn.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise DdrunError(f"S ({', '.join(bad)}) became NaN/Inf at iteration {it}; stopped, the last good "
                             f"checkpoint (iteration {st.saved_at}) is kept at {self.ckpt_path}")
        if (it + 1) % int(self.cfg.log_every) == 0 and not self.is_eval_step(it + 1):
            self.tracker.log({"loss": st.loss, "seconds": st.seconds}, it + 1)

    def run_stages(self, stop: StopSignals) -> None:
        """Apply the post-distillation stages not yet done, checkpointing after each."""
        for name, stage in self.stages.items():
            if name in self.state.stages_done:
                continue
            log.info("stage %s", name)
            self.syn = stage(self.syn, self.real, self.seed)
            self.state.stages_done.append(name)
            self.checkpoint(self.iterations)
            if stop.pending is not None:
                stop.stop(self.iterations, self.ckpt_path)

    def evaluate(self, it: int) -> dict | None:
        """Image grid, the objective's own protocol, the evaluator; logs all of it; returns the result."""
        syn, real, st = self.syn, self.real, self.state
        self.tracker.images(real.to_pixels(syn.images.detach()), int(self.cfg.ipc), it)
        decoded = self.param.decode(syn)
        extra = self.objective.report(decoded, real, self.fetcher, self.seed) if self.objective else {}
        if extra:
            log.info("iteration %d: %s", it, ", ".join(f"{k} {v:.2f}" for k, v in extra.items()))
        if self.evaluator is None:
            if extra or st.loss is not None:
                self.tracker.log({"loss": st.loss, **extra, "seconds": st.seconds}, it)
            return None
        with speed.autocast(self.device):
            res = self.evaluator(decoded, real, self.seed)
        self.tracker.log({"loss": st.loss, "acc_mean": res["acc_mean"], "acc_std": res["acc_std"], **extra,
                          "seconds": st.seconds, "per_net": res["per_net"]}, it)
        log.info("iteration %d: accuracy %.2f +- %.2f (%s)", it, res["acc_mean"], res["acc_std"], res["protocol"])
        if syn.lr is not None and self.evaluator.uses_learned_lr:
            log.info("iteration %d: the evaluation networks trained with S's learned step size %.4g", it,
                     float(syn.lr.detach()))
        return {**res, **extra}

    def checkpoint(self, it: int) -> None:
        """Save the run state at iteration ``it``; a failed write stops the run and leaves the previous
        checkpoint as it was."""
        st = self.state
        st.iteration, st.metrics = it, self.tracker.rows
        parts = {"syn": self.syn.state(), "config_hash": self.chash,
                 "config": json.dumps(OmegaConf.to_container(self.cfg, resolve=True), default=str)}
        for name, part in (("fetcher", self.fetcher), ("objective", self.objective), ("optimizer", self.optimizer),
                           ("scheduler", self.scheduler)):
            parts[name] = part.state_dict() if part is not None else {}
        try:
            st.save(self.ckpt_path, parts)
        except OSError as exc:
            kept = "no earlier checkpoint" if st.saved_at is None else \
                f"the checkpoint of iteration {st.saved_at} in {self.ckpt_path} is intact"
            raise DdrunError(f"could not write the checkpoint of iteration {it} ({exc.strerror or exc}); stopped, "
                             f"{kept}: free space and rerun the same command to resume") from None


def distill(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run one distillation described by ``cfg`` into ``run_dir``.

    Writes ``synthetic.pt``, ``images/*.png``, ``metrics.jsonl`` and ``checkpoint.pt`` (resumed from when present
    and ``resume`` is true).

    Returns:
        ``{"acc_mean", "acc_std", "per_net", "protocol", "protocol_fields", "run_dir", "synthetic"}`` of the final
        evaluation (accuracies in percent), or without the accuracies when ``evaluator.num_eval=0``.

    Resume (``ddrun/checkpoint.py``): ``checkpoint.pt`` is written atomically every ``checkpoint_every``
    iterations, before and after every evaluation, after every post-distillation stage, and at the next iteration
    boundary after SIGTERM / SIGUSR1 / SIGUSR2; it holds the run state, S (images, labels, learned lr), the
    optimizer, scheduler, fetcher and objective states and the RNG states. A run started in a directory that has
    one continues from it (``resume=true``) and ends with the same S as an uninterrupted run (bitwise on CPU).

    Raises:
        ConfigError, DataError: bad configuration or data (one-line messages).
        DdrunError: the loss, S or a learned quantity became NaN/Inf, or a checkpoint could not be written (the
            last good checkpoint is kept and named).
        RunLocked: another live run holds ``run_dir``.
        Preempted: stopped by a signal after saving the checkpoint.
    """
    validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir), StopSignals() as stop:
        run = Distillation(cfg, run_dir)
        try:
            return run.run(stop)
        finally:
            run.tracker.close()


@hydra.main(version_base="1.3", config_path="pkg://ddrun.conf", config_name="distill")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    with command_errors("distill", log):
        out = distill(cfg, HydraConfig.get().runtime.output_dir)
    acc = out.get("acc_mean")
    if acc is not None:
        print(f"final accuracy {acc:.2f} +- {out['acc_std']:.2f} ({out['protocol']})")
    print(f"results in {out['run_dir']} (synthetic.pt, images/, metrics.jsonl, wandb/)")
    return None if acc is None or math.isnan(acc) else acc

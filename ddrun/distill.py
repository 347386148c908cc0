"""``ddrun distill``: the distillation loop.

    S = init(T, ipc); param.encode_init(S, T)              # fresh runs only; pixels: nothing to do
    for it in range(start, iterations):
        fetched = fetcher.fetch(it)                         # fresh | fixed | expert segment | pool member | teacher
        for step in range(schedule.steps):                  # DC/DSA: several updates of S per network
            if step: fetched = schedule.between(fetched, param.decode(S), T, g)   # train the network on S
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

import copy
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from ddrun import record, speed
from ddrun.checkpoint import RunLock, RunState, StopSignals, set_rng_state
from ddrun.contracts import validates
from ddrun.progress import Progress
from ddrun.provenance import Provenance, config_diff
from ddrun.schema import check_common, target_object
from ddrun.selection import VALIDATING, EarlyStopping
from ddrun.utils import (ConfigError, DdrunError, build, command_errors, derive_seed, resolve_device,
                         seed_everything)

log = logging.getLogger("ddrun.distill")
BEST_FILE = "synthetic_best.pt"  # keep_best: S at its best evaluation


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
    ``${oc.select:<table>.ipc${ipc}.<field>,???}`` (or with a nested ``oc.select`` default ending in ``???``): when
    the table has no entry for this ipc the value is ``???``
    (OmegaConf's "must be given"), and this raises a one-line ConfigError naming the key, the table's ipc values
    and how to set the key by hand."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    for key, value in _leaves(raw):
        compact = value.replace(" ", "").rstrip("}") if isinstance(value, str) else ""
        if not ("ipc${ipc}" in compact and compact.endswith(",???")):
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
    """Check every knob before any work (``ddrun.schema.check_common``, the presets' per-ipc tables, the baselines,
    the training subset against ipc); raise a one-line ConfigError naming the key."""
    check_common(cfg, "distill")
    subset = OmegaConf.select(cfg, "dataset.train_subset")
    if subset is not None and subset < int(cfg.ipc):
        raise ConfigError(f"dataset.train_subset={subset} keeps fewer real images per class than ipc={cfg.ipc}: "
                          f"raise it to >= {cfg.ipc} or pass null (all)")
    init = str(OmegaConf.select(cfg, "init._target_", default="real")).rsplit(".", 1)[-1]
    hint = f"to distill from that initialization use `init={init} method=dm` (or another method)"
    if has_objective(cfg) and OmegaConf.select(cfg, "fetcher._target_") is None:
        raise ConfigError(f"method={cfg.preset.name} selects no fetcher (S is ipc real images chosen by init={init}, "
                          f"not optimized), so the objective has no network; {hint}")
    own = {"random": "real"}.get(str(cfg.preset.name), str(cfg.preset.name))  # a selection method's own init
    if not has_objective(cfg) and own in ("real", "herding", "kcenter", "rded") and init != own:
        raise ConfigError(f"method={cfg.preset.name} is S = the images init={own} selects; with init={init} it "
                          f"would be recorded as {cfg.preset.name}: drop the init override")
    if int(cfg.iterations) > 0 and not has_objective(cfg):
        raise ConfigError(f"method={cfg.preset.name} is a baseline (ipc real images chosen by init={init}, not "
                          f"optimized): it takes iterations=0, not {cfg.iterations}; {hint}")
    check_per_ipc_tables(cfg)
    check_parametrized_init(cfg)
    check_syn_scheduler(cfg)
    check_replay_inits(cfg)
    param = str(OmegaConf.select(cfg, "parametrization._target_", default=""))
    for name, node in (cfg.get("stages") or {}).items():
        if str(OmegaConf.select(node, "_target_", default="")) == "ddrun.stages.Relabel" and \
                param != "ddrun.contracts.Parametrization":
            raise ConfigError(f"stages.{name} relabels S's images, but S is stored factorized "
                              f"({param.rsplit('.', 1)[-1]}): its labels belong to the stored images, not to the "
                              f"decoded ones a teacher reads; drop the stage or pass parametrization=pixels")


def check_replay_inits(cfg: DictConfig) -> None:
    """Every replay evaluator of the run (``evaluator``, ``beside.*``) gets a theta_0 its fetcher gives
    (:func:`ddrun.evaluators.replay.resolve_init`): refused here, before the run directory and the data, rather
    than by a crash at the first evaluation (``init=pretrained``) or a silent replay from a network S was never
    distilled for (``init=fixed`` with ``fetcher=random``); and a replay of a run whose objective is not DD's
    (its S holds no steps: :func:`ddrun.objectives.meta.require_steps` would refuse it only at the first
    evaluation). Evaluators with ``num_eval`` 0 are not run: skipped.

    Raises:
        ConfigError: one line naming ``evaluator.init`` / ``beside.<name>.init``."""
    from ddrun.evaluators.replay import ReplayEvaluator, resolve_init

    nodes = [("evaluator", cfg.get("evaluator"))]
    if cfg.get("beside_protocols", True):
        nodes += [(f"beside.{name}", node) for name, node in (cfg.get("beside") or {}).items()]
    for key, node in nodes:
        target = OmegaConf.select(node, "_target_") if node is not None else None
        if target_object(target) is ReplayEvaluator and int(OmegaConf.select(node, "num_eval", default=1)) >= 1:
            objective = OmegaConf.select(cfg, "objective._target_", default=None)
            cls = target_object(objective)  # None: unimportable (reported when it is built), or no objective
            if objective is None or (cls is not None and not getattr(cls, "stores_steps", False)):
                raise ConfigError(f"{key}: evaluator=replay evaluates DD sets only (method=dd or method=ld, whose S "
                                  f"holds DD's per-step step sizes); this run's objective "
                                  f"({str(objective).rsplit('.', 1)[-1]}) stores none: use evaluator=default or "
                                  f"evaluator=cross_arch")
            resolve_init(str(OmegaConf.select(node, "init", default="auto")),
                         OmegaConf.select(node, "fetcher", default=None), key)


def check_syn_scheduler(cfg: DictConfig) -> None:
    """Build ``syn_scheduler`` on a one-parameter SGD optimizer, so its constructor's checks (``ddrun.schedule``:
    a zero step, a negative decay, a word where a number goes) refuse the run before the data is loaded rather
    than after it (the real scheduler is built on S's optimizer once S exists). Skipped without an objective
    (nothing optimizes S) or a scheduler.

    Raises:
        ConfigError: the scheduler's own one-line error, or ``syn_scheduler: <error>`` for any other failure of its
            target (e.g. torch's own schedulers' ValueError)."""
    node = cfg.get("syn_scheduler")
    if node is None or not has_objective(cfg):
        return
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        build(node)(probe)
    except DdrunError:
        raise
    except Exception as exc:  # noqa: BLE001 - a foreign target's error (ValueError, TypeError ...): one line
        cause = exc.__cause__ or exc
        raise ConfigError(f"syn_scheduler ({OmegaConf.select(node, '_target_')}): {type(cause).__name__}: "
                          f"{str(cause).splitlines()[0] if str(cause) else ''}") from None


def check_parametrized_init(cfg: DictConfig) -> None:
    """IDC's multi-formation initializes S itself (``encode_init``: factor^2 random real images per stored image,
    Kim et al. 2022, Sec. 3.2): refuse an ``init`` other than ``real``, whose images it would replace."""
    param = str(OmegaConf.select(cfg, "parametrization._target_", default=""))
    init = str(OmegaConf.select(cfg, "init._target_", default="")).rsplit(".", 1)[-1]
    if param.endswith("MultiFormation") and init != "real":
        choice = {"base_images": "base"}.get(init, init)
        raise ConfigError(f"parametrization=idc initializes S with IDC's own mix of factor^2 random real images per "
                          f"stored image, which would replace init={choice}'s images: pass init=real")


# top-level keys that do not change S: left out of the config hash and of the "what differs" of a refused rerun
NOT_S = ("paths", "logger", "evaluator", "eval_every", "eval_at_start", "log_every", "iterations", "resume",
         "overwrite", "device", "hydra", "checkpoint_every", "progress_every", "beside", "speed", "deterministic",
         "keep_best", "beside_protocols")


def build_beside(name: str, node: DictConfig):
    """The evaluator ``beside.<name>``.

    Raises:
        ConfigError: its constructor refused a knob: the message names ``beside.<name>.<key>`` where the
            evaluator says ``evaluator.<key>`` (evaluators name their keys as the headline evaluator's)."""
    try:
        return build(node)
    except ConfigError as err:
        raise ConfigError(str(err).replace("evaluator.", f"beside.{name}.")) from None


# targets renamed without changing what they build: hashed under their old name, so checkpoints and seeds of runs
# made before the rename still resume and pool (syn_scheduler=step: ddrun.schedule.step_lr is a checked StepLR)
SAME_TARGET = {"ddrun.schedule.step_lr": "torch.optim.lr_scheduler.StepLR"}


def _hashed(cfg: DictConfig, drop: tuple[str, ...]) -> str:
    c = OmegaConf.to_container(cfg, resolve=True)
    for k in drop:
        c.pop(k, None)
    sched = c.get("syn_scheduler")
    if isinstance(sched, dict) and sched.get("_target_") in SAME_TARGET:
        c["syn_scheduler"] = {**sched, "_target_": SAME_TARGET[sched["_target_"]]}
    # sorted keys: the hash must not depend on the order in which the config files list them
    return hashlib.sha1(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:12]


def config_hash(cfg: DictConfig) -> str:
    """A short hash of everything that determines S (not paths, logging or evaluation settings)."""
    return _hashed(cfg, NOT_S)


def setting_hash(cfg: DictConfig) -> str:
    """:func:`config_hash` without the seed: equal for the seeds of one experiment (``ddrun report`` pools only
    runs whose setting hash and iterations agree)."""
    return _hashed(cfg, (*NOT_S, "seed"))


def effective_config(cfg: DictConfig, real) -> DictConfig:
    """``cfg`` with ``dataset.train_subset`` / ``test_subset`` as the loaded data has them (``real.train_subset`` /
    ``real.test_subset``: null when the subset asked for is at least every class's size, i.e. the whole split), so
    that the record's setting and hashes and S's meta say what was used and such a run pools with the full-split
    runs. ``cfg`` is left as given (a copy is returned when a value differs): the checkpoint keeps the hash of the
    configuration as given, because a resume is checked against it before the data is loaded."""
    keys = {k: getattr(real, k) for k in ("train_subset", "test_subset")
            if OmegaConf.select(cfg, f"dataset.{k}") != getattr(real, k)}
    if not keys:
        return cfg
    out = copy.deepcopy(cfg)
    with open_dict(out):
        for k, v in keys.items():
            out.dataset[k] = v
    return out


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
        self.provenance = Provenance(run_dir)
        self.state, ckpt = self._open_run_dir()
        self.resumed = ckpt is not None
        self._build(ckpt)
        if ckpt is not None:
            try:
                self._restore(ckpt)
            except BaseException:
                self.tracker.close()
                raise
            log.info("resuming from %s at iteration %d (restored in %.2f s)", ckpt["path"], self.state.iteration,
                     time.perf_counter() - t0)

    def _open_run_dir(self) -> tuple[RunState, dict | None]:
        """Decide what this attempt does with the run directory: start a run, resume the one there, or refuse
        (leaving the directory as it was). Returns the run state and the checkpoint to resume from (or None)."""
        prov, cfg = self.provenance, self.cfg
        if prov.holds_run() and not cfg.resume:
            if not cfg.overwrite:
                prov.refuse()
                raise ConfigError(f"{self.run_dir} holds a run and resume=false: pass overwrite=true to move it to "
                                  f"{self.run_dir}/archive/ and start over, or use another hydra.run.dir")
            log.warning("overwrite=true: the earlier run is kept in %s", prov.archive())
        restored = RunState.load(self.ckpt_path) if cfg.resume else None
        if restored is None:
            prov.keep_original()
            prov.record_attempt("started")
            return RunState(), None
        state, ckpt = restored
        try:
            self._check_resumable(ckpt)
        except ConfigError:
            prov.refuse()
            raise
        prov.restore_original()
        prov.record_attempt(f"resumed at iteration {state.iteration}")
        return state, ckpt

    def _check_resumable(self, ckpt: dict) -> None:
        """Refuse a checkpoint of another configuration (naming every key that differs, old -> new) or one this
        ``iterations`` does not continue."""
        if ckpt.get("config_hash") != self.chash:
            old = json.loads(ckpt.get("config") or "{}")
            diff = config_diff(old, OmegaConf.to_container(self.cfg, resolve=True), NOT_S)
            raise ConfigError(f"{ckpt['path']} was written by a run with another configuration ("
                              f"{'; '.join(diff) or 'hash ' + str(ckpt.get('config_hash'))}); use another run "
                              f"directory, or resume=false overwrite=true to archive that run and start over")
        done, stages = int(ckpt["iteration"]), ckpt.get("stages_done") or []
        if done > self.iterations or (stages and done < self.iterations):
            raise ConfigError(f"{ckpt['path']} is at iteration {done}{' with its stages done' if stages else ''}, "
                              f"which iterations={self.iterations} does not continue: pass iterations={done}, "
                              f"another run directory, or resume=false overwrite=true")

    def _build(self, ckpt: dict | None) -> None:
        """Build every component from the config: the ones that need no data first (their constructors check
        their knobs before any data is loaded), then the dataset, S (from the checkpoint when resuming: the
        initializer, e.g. K-Center's network training, is not run again) and the rest."""
        cfg = self.cfg
        self.evaluator = build(cfg.evaluator)
        if self.evaluator.num_eval < 1:  # evaluator.num_eval=0: distill only
            self.evaluator = None
        beside = {name: build_beside(name, node) for name, node in (cfg.get("beside") or {}).items()
                  if cfg.get("beside_protocols", True)}
        self.beside = {name: ev for name, ev in beside.items() if ev.num_eval >= 1}
        self.objective = build(cfg.objective) if has_objective(cfg) else None
        self.schedule, self.param = build(cfg.schedule), build(cfg.parametrization)
        self.stages = {name: build(node) for name, node in (cfg.get("stages") or {}).items()}
        self.early = self._early_stopping()
        self.real = build(cfg.dataset).to(self.device)
        self.effective = effective_config(cfg, self.real)  # the record's and S's hashes and setting
        for ev in [self.evaluator, *self.beside.values()]:
            if ev is not None:
                ev.prepare(self.real)  # e.g. the KD evaluator's teachers: missing ones stop the run now
        for stage in self.stages.values():
            stage.prepare(self.real)  # e.g. the relabel stage's teachers: not after a long distillation
        # the fetcher before S: a missing or short buffer / teacher stops the run before a long init (K-Center's
        # network training, DATM's expert labels) is spent
        self.fetcher = (build(cfg.fetcher)(real=self.real, device=self.device, seed=self.seed) if self.objective
                        else None)
        self.syn = self._initial_set(ckpt)
        if self.early is not None:
            self.early.draw(self.real, self.seed)
        self.optimizer = self.scheduler = None
        if self.objective is not None:
            self.objective.prepare(self.syn, self.real)
            groups = self.objective.param_groups(self.syn)
            if not groups:
                raise ConfigError(f"nothing in S is learned: objective.lr_img={self.objective.lr_img} freezes the "
                                  f"images and no step size or labels are learned; set objective.lr_img > 0")
            self.optimizer = build(cfg.syn_optimizer)(groups, lr=self.objective.lr_img)
            if cfg.get("syn_scheduler") is not None:
                self.scheduler = build(cfg.syn_scheduler)(self.optimizer)
        from ddrun.tracking import Tracker

        self.tracker = Tracker(self.run_dir, OmegaConf.to_container(cfg, resolve=True), resume_id=self.state.wandb_id,
                               **OmegaConf.to_container(cfg.logger, resolve=True))
        self.state.wandb_id = self.tracker.run_id
        self.tracker.restore(self.state.metrics)  # a fresh run starts metrics.jsonl empty; a resumed one as saved

    def _early_stopping(self) -> EarlyStopping | None:
        """The ``early_stopping`` rule (its validation split is drawn once the data is loaded), or None when it is
        off.

        Raises:
            ConfigError: the objective has no validation loss, or ``keep_best`` is set too (both choose the S
                kept in ``synthetic_best.pt``)."""
        early = EarlyStopping.from_config(self.cfg.get("early_stopping"))
        if early is None:
            return None
        if not validates(self.objective):
            raise ConfigError(f"early_stopping.every={early.every}: objective {self.objective_name()} has no "
                              f"validation loss (those with one: {', '.join(VALIDATING)}); pass "
                              f"early_stopping.every=null")
        if self.cfg.get("keep_best"):
            raise ConfigError("keep_best=true and early_stopping.every both choose the S kept in "
                              f"{BEST_FILE} (by test accuracy / by validation loss): set one of them")
        return early

    def _initial_set(self, ckpt: dict | None):
        """S at the start of this attempt, on the device, with its metadata."""
        from ddrun.synthetic import SyntheticSet

        cfg, real = self.cfg, self.real
        if ckpt is None:
            syn = build(cfg.init)(real, int(cfg.ipc), torch.Generator().manual_seed(derive_seed(self.seed, 1)))
            self.param.encode_init(syn, real, torch.Generator().manual_seed(derive_seed(self.seed, 1, 1)))
        else:
            syn = SyntheticSet.from_state(ckpt["syn"])
        syn.meta.update(dataset=real.name, num_classes=real.num_classes, channels=real.channels,
                        im_size=list(real.im_size), mean=list(real.mean), std=list(real.std), zca=real.zca is not None,
                        zca_form=getattr(real.zca, "form", None), zca_centre=getattr(real.zca, "centre", None),
                        layernorm=real.layernorm, ipc=int(cfg.ipc),
                        method=str(cfg.preset.name),
                        config_hash=config_hash(self.effective),
                        setting_hash=setting_hash(self.effective), **self._theta0_meta())
        syn.meta.pop("zca_regularization", None)  # with ZCA only; evaluate compares it (older S lack it: unchecked)
        if getattr(real.zca, "regularization", None) is not None:
            syn.meta["zca_regularization"] = float(real.zca.regularization)
        syn = syn.to(self.device)
        syn.meta.update(self.param.describe(syn))
        return syn

    def _theta0_meta(self) -> dict:
        """What a replay of S's steps needs to rebuild the run's networks (``evaluator=replay evaluator.init=fixed``
        checks it): the run's ``seed``, the fetcher's class name (``fetcher``) and its network (``net``:
        :func:`ddrun.protocol.net_name`, ``net_kwargs``: its constructor keywords)."""
        from ddrun.protocol import net_kwargs, net_name

        meta = {"seed": int(self.seed)}
        if self.fetcher is not None:  # its class: a fixed-init replay needs FixedFetcher's theta_0
            meta["fetcher"] = type(self.fetcher).__name__
        factory = getattr(self.fetcher, "net_factory", None)
        if factory is not None:
            kwargs = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                      for k, v in net_kwargs(factory).items()}
            meta.update(net=net_name(factory), net_kwargs=kwargs)
        return meta

    def _restore(self, ckpt: dict) -> None:
        """Component states from the checkpoint, after they are built (``prepare`` switched on what S learns)."""
        self.syn.load_state(ckpt["syn"])
        for name, part in (("fetcher", self.fetcher), ("objective", self.objective), ("optimizer", self.optimizer),
                           ("scheduler", self.scheduler), ("selection", self.early)):
            if part is not None and ckpt.get(name):
                part.load_state_dict(ckpt[name])
        self._check_ended()
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])

    def _check_ended(self) -> None:
        """A run that stopped early stays ended (its S is the selected one); one that ended at its last iteration
        with S reverted to the best validation cannot be extended (the unreverted S is gone)."""
        st = None if self.early is None else self.early.state
        if st is None or st.ended_at is None:
            return
        if st.stopped:
            log.info("this run stopped early at iteration %d (early_stopping.patience): nothing more to do",
                     st.ended_at)
            self.iterations = st.ended_at
        elif st.ended_at < self.iterations and self.early.revert and st.best_iteration != st.ended_at:
            raise ConfigError(f"this run ended at iteration {st.ended_at} with S reverted to iteration "
                              f"{st.best_iteration} (early_stopping.revert=true), so iterations={self.iterations} "
                              f"cannot continue it: use another run directory")

    # --- the loop -----------------------------------------------------------------------------------------
    def run(self, stop: StopSignals) -> dict:
        """The loop: iterations, then the stages, then the final evaluation, ``synthetic.pt`` and ``results.json``;
        returns the final result."""
        if self.evaluator is not None:
            log.info("evaluation protocol: %s", self.evaluator.protocol())
        bar = Progress(self.iterations, self.state.iteration, "distill", float(self.cfg.progress_every), log)
        try:
            for it in range(self.state.iteration, self.iterations + 1):
                if self.early is not None and self.early.due(it, self.iterations) and not self.state.stages_done:
                    self.select(it)
                if it == self.iterations:
                    self.run_stages(stop)
                self.boundary(it, stop)
                if it == self.iterations:
                    break
                self.step(it)
                bar.update(1, loss=self.state.loss, acc=self._last_acc())
            self.syn.meta["iteration"] = self.final_iteration()
            self.syn.save(self.run_dir / "synthetic.pt")
            self.write_record()
        finally:
            bar.close()
            self.tracker.close()
        out = {"run_dir": str(self.run_dir), "synthetic": str(self.run_dir / "synthetic.pt")}
        return {**out, **(self.state.result or {})}

    def _last_acc(self) -> float | None:
        r = self.state.result
        return None if r is None or "acc_mean" not in r else round(float(r["acc_mean"]), 2)

    def is_eval_step(self, it: int) -> bool:
        return it == self.iterations or (it % self.eval_every == 0 and (it > 0 or bool(self.cfg.eval_at_start)))

    def _evaluated(self, it: int) -> bool:
        """Whether iteration ``it`` is evaluated already; the final one under the current protocol (a finished run
        rerun with another evaluator is evaluated again, and both results are kept)."""
        if self.state.evaluated_at != it:
            return False
        if it < self.iterations or self.evaluator is None:
            return True
        fields = self.evaluator.protocol_fields()
        return any(f["protocol"].get("evaluator") is not None and
                   {k: v for k, v in f["protocol"].items() if k != "test"} == fields for f in self.state.finals)

    def boundary(self, it: int, stop: StopSignals) -> None:
        """Between iterations ``it - 1`` and ``it``: checkpoint when due, act on a stop signal, evaluate when
        due."""
        st = self.state
        pending_eval = self.is_eval_step(it) and not self._evaluated(it)
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
            if self.cfg.get("keep_best"):
                self.keep_if_best(it)
            if it == self.iterations and st.result is not None and "acc_mean" in st.result:
                for res in (st.result, *st.result.get("beside", {}).values()):  # each under its own protocol
                    st.finals.append(record.evaluation(res, it, self.real))
            self.checkpoint(it)

    def best_row(self, before: int | None = None) -> dict | None:
        """The metrics row of the best evaluation under the current protocol (the last evaluation's), among the
        evaluations before iteration ``before`` (all when None)."""
        rows = [r for r in self.tracker.rows if "acc_mean" in r and (before is None or r["iteration"] < before)]
        if not rows:
            return None
        last = [r for r in self.tracker.rows if "acc_mean" in r][-1].get("protocol")
        return max((r for r in rows if r.get("protocol") == last), key=lambda r: r["acc_mean"], default=None)

    def keep_if_best(self, it: int) -> None:
        """``keep_best``: write S to ``synthetic_best.pt`` when the evaluation of iteration ``it`` is the best so
        far under the current protocol. The selection uses the evaluator's test accuracy (as FRePo's reference keeps
        its ``best_ckpt`` and MTT's papers report the best evaluation): a number chosen on the test split, which
        the record labels as such."""
        r = self.state.result
        if r is None or "acc_mean" not in r:
            return
        prior = self.best_row(before=it)
        if prior is None or r["acc_mean"] > prior["acc_mean"]:
            self.keep(it, f"best test accuracy over the evaluations ({r['protocol']})")
            log.info("iteration %d: best evaluation so far, S kept in %s", it, self.run_dir / BEST_FILE)

    def keep(self, it: int, selected_by: str) -> None:
        """Write S of iteration ``it`` to ``synthetic_best.pt`` with how it was selected in its metadata."""
        from ddrun.files import atomic_save

        best = self.syn.state()
        best["meta"] = {**best["meta"], "iteration": it, "selected_by": selected_by}
        atomic_save(best, self.run_dir / BEST_FILE)

    def select(self, it: int) -> None:
        """``early_stopping`` before iteration ``it`` (``ddrun.selection``): score S on the validation split, keep
        it when it is the best so far; at the last iteration, or when the patience ran out (the run then ends at
        ``it``), revert S to the best one when ``revert`` is set."""
        early = self.early
        scores = self.objective.validation(self.param.decode(self.syn), early.x_val, early.y_val, self.seed)
        self.tracker.log({k: float(v) for k, v in scores.items()}, it)
        if early.observe(it, float(scores["val_loss"])):
            self.keep(it, early.describe(self.objective_name()))
        stop = early.exhausted(it)
        if not (stop or it == self.iterations):
            return
        best = early.state.best_iteration
        if stop:
            log.info("early stopping at iteration %d: no lower validation loss since iteration %d (patience %d)",
                     it, best, early.patience)
            self.iterations = it
        early.state.ended_at, early.state.stopped = it, stop
        if early.revert and best != it:
            self.syn.load_state(torch.load(self.run_dir / BEST_FILE, map_location="cpu", weights_only=True))
            log.info("iteration %d: S reverted to iteration %d (lowest validation loss %.4g)", it, best,
                     early.state.best_loss)

    def objective_name(self) -> str:
        return str(OmegaConf.select(self.cfg, "objective._target_", default="none")).rsplit(".", 1)[-1]

    def final_iteration(self) -> int:
        """The iteration the final S comes from: the last one, or the best validated one when reverted."""
        early = self.early
        if early is not None and early.revert and early.state.best_iteration is not None:
            return early.state.best_iteration
        return self.iterations

    def write_record(self) -> None:
        """``results.json`` (``ddrun.record``): the run's identity, setting, S's digest and its final evaluations."""
        last = self.state.finals[-1]["protocol_line"] if self.state.finals else None
        best = self.best_row() if last is not None else None
        kept = self.run_dir / BEST_FILE
        config = OmegaConf.to_container(self.effective, resolve=True)
        rec = {"command": "distill", "run_dir": str(self.run_dir), "method": str(self.cfg.preset.name),
               "dataset": self.real.name, "ipc": int(self.cfg.ipc), "seed": self.seed,
               "iterations": int(self.cfg.iterations), "early_stopping": self.selection_record(),
               "config_hash": config_hash(self.effective), "setting_hash": setting_hash(self.effective),
               "setting": record.flat_setting(config, NOT_S + ("seed",)),
               "synthetic": record.synthetic_info(self.syn, self.run_dir / "synthetic.pt",
                                                  self.param.describe(self.syn)),
               "evaluations": self.state.finals, "device": record.device_name(self.device),
               "seconds": round(self.state.seconds, 2),
               "best": None if best is None else {"iteration": best["iteration"], "acc_mean": best["acc_mean"],
                                                  "acc_std": best.get("acc_std"),
                                                  "protocol_line": best.get("protocol", last),  # the headline's
                                                  "selected_on": "the evaluator's test split",
                                                  "synthetic": str(kept) if kept.is_file() else None}}
        try:
            record.write(self.run_dir, rec)
        except OSError as exc:
            raise DdrunError(f"could not write {self.run_dir / record.FILENAME} ({exc.strerror or exc}); S is "
                             f"saved in {self.run_dir / 'synthetic.pt'}") from None

    def selection_record(self) -> dict | None:
        """The record's ``early_stopping`` entry: how S was selected, the best validated iteration and loss, where
        the run stopped (None: it ran all its iterations) and whether the final S is the best one."""
        early = self.early
        if early is None:
            return None
        st = early.state
        return {"selected_by": early.describe(self.objective_name()), "best_iteration": st.best_iteration,
                "best_val_loss": st.best_loss,
                "stopped_at": st.ended_at if st.ended_at is not None and st.ended_at < int(self.cfg.iterations)
                else None,
                "final_is_best": bool(early.revert), "synthetic_best": str(self.run_dir / BEST_FILE)}

    def step(self, it: int) -> None:
        """Iteration ``it``: fetch a network, ``schedule.steps`` updates of S, then the checks."""
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(derive_seed(self.seed, 2, it))
        fetched = self.fetcher.fetch(it)
        for step in range(self.schedule.steps):
            if step > 0:
                fetched = self.schedule.between(fetched, self.param.decode(self.syn), self.real, g)
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
        self.tracker.images(real.to_pixels(syn.images.detach(), clamp=False), int(self.cfg.ipc), it,
                            class_names=real.class_names)
        decoded = self.param.decode(syn)
        extra = self.objective.report(decoded, real, self.fetcher, self.seed) if self.objective else {}
        if extra:
            log.info("iteration %d: %s", it, ", ".join(f"{k} {v:.2f}" for k, v in extra.items()))
        if self.evaluator is None:
            if extra or st.loss is not None:
                self.tracker.log({"loss": st.loss, **extra, "seconds": st.seconds}, it)
            return None
        res = speed.evaluate(self.evaluator, decoded, real, self.seed, self.device)
        line = record.evaluation(res, it, real)["protocol_line"]
        res, also = self.evaluate_beside(res, decoded, it)
        stored = self.param.describe(syn)  # the storage budget and what the networks trained on
        view = {k: v for k, v in res.items() if k.startswith("teacher_")}  # the KD evaluator's reading of S
        self.tracker.log({"loss": st.loss, "acc_mean": res["acc_mean"], "acc_std": res["acc_std"], **extra, **also,
                          **view, "seconds": st.seconds, "per_net": res["per_net"], "protocol": line, **stored}, it)
        log.info("iteration %d: accuracy %.2f +- %.2f (%s; S: %d stored images, %d decoded, %s)", it,
                 res["acc_mean"], res["acc_std"], res["protocol"], stored["stored_images"],
                 stored["decoded_images"], stored["parametrization"])
        if syn.lr is not None and self.evaluator.uses_learned_lr:
            log.info("iteration %d: the evaluation networks trained with S's learned step size %.4g", it,
                     float(syn.lr.detach()))
        return {**res, **extra, **also, **stored}

    def evaluate_beside(self, res: dict, decoded, it: int) -> tuple[dict, dict[str, float]]:
        """The ``beside`` evaluators on S: ``(res with "beside": {name: result}, {"<name>/acc_mean": ..,
        "<name>/acc_std": ..})``; each result states its own protocol."""
        if not self.beside:
            return res, {}
        results = {name: speed.evaluate(ev, decoded, self.real, self.seed, self.device)
                   for name, ev in self.beside.items()}
        flat = {f"{name}/{k}": r[k] for name, r in results.items() for k in ("acc_mean", "acc_std")}
        for name, r in results.items():
            log.info("iteration %d: %s %.2f +- %.2f (%s)", it, name, r["acc_mean"], r["acc_std"], r["protocol"])
        return {**res, "beside": results}, flat

    def checkpoint(self, it: int) -> None:
        """Save the run state at iteration ``it``; a failed write stops the run and leaves the previous
        checkpoint as it was."""
        st = self.state
        st.iteration, st.metrics = it, self.tracker.rows
        parts = {"syn": self.syn.state(), "config_hash": self.chash,
                 "config": json.dumps(OmegaConf.to_container(self.cfg, resolve=True), default=str)}
        for name, part in (("fetcher", self.fetcher), ("objective", self.objective), ("optimizer", self.optimizer),
                           ("scheduler", self.scheduler), ("selection", self.early)):
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
        ``{"acc_mean", "acc_std", "per_net", "protocol", "protocol_fields", "parametrization", "stored_images",
        "decoded_images", "run_dir", "synthetic"}`` of the final evaluation (accuracies in percent; the storage
        budget of S and the count its parametrization decodes), or without them when ``evaluator.num_eval=0``.

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
    written = ["synthetic.pt", "images/", "metrics.jsonl"] + (["wandb/"] if (Path(out["run_dir"]) / "wandb").is_dir()
                                                              else [])
    print(f"results in {out['run_dir']} ({', '.join(written)})")
    return None if acc is None or math.isnan(acc) else acc

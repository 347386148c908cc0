"""``ddrun distill``: the distillation loop.

    S = init(T, ipc)
    for it in range(start, iterations):
        net = fetcher.fetch(it)                      # fresh | fixed | expert checkpoint | pool member
        repeat fetcher.outer_loop times:
            loss = objective(S, T, net, it)          # the distillation objective
            optimizer_S.step()                       # images (and learned lr / labels)
            net = fetcher.update(net, S, T)          # between two updates: train net on S if the method says so
        every eval_every: evaluator(S), image grid, checkpoint
    evaluator(S) (final); save S

Nothing here is method-specific: every part is built with ``hydra.utils.instantiate`` from the config groups
``dataset``, ``net``, ``init``, ``fetcher``, ``objective``, ``evaluator`` and ``logger``. All randomness of
iteration ``it`` comes from a generator seeded by ``(seed, it)``, so a run repeats exactly from ``seed`` and a
resumed run continues as if it had never stopped.
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

from ddrun.checkpoint import RunLock, StopSignals, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ddrun.utils import ConfigError, DdrunError, build, command_errors, derive_seed, resolve_device, seed_everything

log = logging.getLogger("ddrun.distill")


def validate(cfg: DictConfig) -> None:
    """Check the top-level knobs before any work; raise a one-line ConfigError naming the key."""
    if int(cfg.ipc) < 1:
        raise ConfigError(f"ipc={cfg.ipc}: must be >= 1 (images per class)")
    if int(cfg.iterations) < 0:
        raise ConfigError(f"iterations={cfg.iterations}: must be >= 0 (0 evaluates the initialization)")
    if int(cfg.eval_every) < 1:
        raise ConfigError(f"eval_every={cfg.eval_every}: must be >= 1")
    for key in ("outer_loop", "inner_loop"):
        if OmegaConf.select(cfg, f"fetcher.{key}") is None:
            loops = OmegaConf.select(cfg, "preset.loops") or {}
            known = ", ".join(k.removeprefix("ipc") for k in loops)
            raise ConfigError(
                f"fetcher.{key} is not set: method={cfg.preset.name} has no loop schedule for ipc={cfg.ipc} "
                f"(the reference defines ipc {known}); pass fetcher.outer_loop=N fetcher.inner_loop=M")


def config_hash(cfg: DictConfig) -> str:
    """A short hash of everything that determines S (not paths, logging or evaluation settings)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    for k in ("paths", "logger", "evaluator", "eval_every", "eval_at_start", "log_every", "iterations", "resume",
              "device", "hydra", "checkpoint_every"):
        c.pop(k, None)
    # sorted keys: the hash must not depend on the order in which the config files list them
    return hashlib.sha1(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:12]


def distill(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run one distillation described by ``cfg`` into ``run_dir``.

    Writes ``synthetic.pt``, ``images/*.png``, ``metrics.jsonl`` and ``checkpoint.pt`` (resumed from when present
    and ``resume`` is true).

    Returns:
        ``{"acc_mean", "acc_std", "per_net", "protocol", "run_dir", "synthetic"}`` of the final evaluation
        (accuracies in percent), or without the accuracies when ``evaluator.num_eval=0``.

    Resume (see ``ddrun/checkpoint.py``): ``checkpoint.pt`` is written atomically every ``checkpoint_every``
    iterations, before and after every evaluation, and at the next iteration boundary after SIGTERM / SIGUSR1 /
    SIGUSR2; it holds S (images, labels, learned lr), the optimizer, fetcher and objective states, the RNG states,
    the iteration, the metrics so far, the last evaluation and the W&B run id. A run started in a directory that has
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
        return _distill(cfg, run_dir, stop)


def _distill(cfg: DictConfig, run_dir: Path, stop: StopSignals) -> dict:
    """The body of :func:`distill`, run while holding the run directory's lock and the stop signals."""
    from ddrun.synthetic import SyntheticSet
    from ddrun.tracking import Tracker

    t_restore = time.perf_counter()
    device = resolve_device(cfg.device)
    seed = int(cfg.seed)
    seed_everything(seed)
    chash = config_hash(cfg)

    ckpt_path = run_dir / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path) if cfg.resume else None
    if ckpt is not None and ckpt.get("config_hash") != chash:
        raise ConfigError(f"{ckpt_path} was written by a run with another configuration "
                          f"(hash {ckpt.get('config_hash')} != {chash}); use another run directory or resume=false")
    if ckpt is not None and int(ckpt["iteration"]) > int(cfg.iterations):
        raise ConfigError(f"{ckpt['path']} is at iteration {ckpt['iteration']}, past iterations={cfg.iterations}: "
                          f"pass iterations>={ckpt['iteration']}, another run directory, or resume=false")

    real = build(cfg.dataset).to(device)
    ipc = int(cfg.ipc)
    if ckpt is None:
        syn = build(cfg.init)(real, ipc, torch.Generator().manual_seed(derive_seed(seed, 1)))
    else:  # S comes from the checkpoint: the initializer (e.g. K-Center's network training) is not run again
        syn = SyntheticSet.from_state(ckpt["syn"])
    syn.meta.update(dataset=real.name, num_classes=real.num_classes, channels=real.channels,
                    im_size=list(real.im_size), mean=list(real.mean), std=list(real.std), zca=real.zca is not None,
                    ipc=ipc, method=str(cfg.preset.name), config_hash=chash)
    syn = syn.to(device)
    objective = build(cfg.objective)
    objective.prepare(syn, real)
    fetcher = build(cfg.fetcher)(real=real, device=device, seed=seed)
    evaluator = build(cfg.evaluator)
    if evaluator.num_eval < 1:  # evaluator.num_eval=0: distill only
        evaluator = None

    start, elapsed, wandb_id = 0, 0.0, None
    if ckpt is not None:
        syn.load_state(ckpt["syn"])  # again after prepare(): the learned lr / labels it switched on get their values
        start, elapsed, wandb_id = int(ckpt["iteration"]), float(ckpt["seconds"]), ckpt.get("wandb_id")
        fetcher.load_state_dict(ckpt.get("fetcher", {}))
        objective.load_state_dict(ckpt.get("objective", {}))

    optimizer = build(cfg.syn_optimizer)(objective.param_groups(syn), lr=objective.lr_img)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])

    tracker = Tracker(run_dir, OmegaConf.to_container(cfg, resolve=True), resume_id=wandb_id,
                      **OmegaConf.to_container(cfg.logger, resolve=True))
    result, last_acc, loss_val, evaluated_at = None, None, None, None
    if ckpt is not None:
        tracker.restore(ckpt.get("metrics", []))
        result, loss_val = ckpt.get("result"), ckpt.get("loss")
        last_acc = None if result is None else result.get("acc_mean")
        evaluated_at = start if ckpt.get("evaluated") else None
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
        log.info("resuming from %s at iteration %d (restored in %.2f s)", ckpt["path"], start,
                 time.perf_counter() - t_restore)
    iterations, eval_every = int(cfg.iterations), int(cfg.eval_every)
    if evaluator is not None:
        log.info("evaluation protocol: %s", evaluator.protocol())

    saved_at = [start if ckpt is not None else None]

    def checkpoint(it: int) -> None:
        """Save the state after ``it`` iterations (and whether its evaluation is done); a failed write stops the
        run and leaves the previous checkpoint as it was."""
        try:
            save_checkpoint({"iteration": it, "seconds": elapsed, "syn": syn.state(),
                             "optimizer": optimizer.state_dict(), "fetcher": fetcher.state_dict(),
                             "objective": objective.state_dict(), "config_hash": chash, "wandb_id": tracker.run_id,
                             "rng": rng_state(), "metrics": tracker.rows, "evaluated": evaluated_at == it,
                             "result": result, "loss": loss_val,
                             "config": OmegaConf.to_container(cfg, resolve=True)}, ckpt_path)
        except OSError as exc:
            kept = "no earlier checkpoint" if saved_at[0] is None else \
                f"the checkpoint of iteration {saved_at[0]} in {ckpt_path} is intact"
            raise DdrunError(f"could not write the checkpoint of iteration {it} ({exc.strerror or exc}); stopped, "
                             f"{kept}: free space and rerun the same command to resume") from None
        saved_at[0] = it

    def evaluate_and_log(it: int, loss: float | None) -> dict | None:
        tracker.images(real.to_pixels(syn.images.detach()), ipc, it)
        extra = objective.report(syn, real, fetcher, seed)  # the paper's own protocol, e.g. KRR accuracy
        if extra:
            log.info("iteration %d: %s", it, ", ".join(f"{k} {v:.2f}" for k, v in extra.items()))
        if evaluator is None:
            if extra or loss is not None:
                tracker.log({"loss": loss, **extra, "seconds": elapsed}, it)
            return None
        res = evaluator(syn, real, seed)
        tracker.log({"loss": loss, "acc_mean": res["acc_mean"], "acc_std": res["acc_std"], **extra,
                     "seconds": elapsed, "per_net": res["per_net"]}, it)
        log.info("iteration %d: accuracy %.2f +- %.2f (%s)", it, res["acc_mean"], res["acc_std"], res["protocol"])
        if syn.lr is not None and getattr(evaluator, "use_learned_lr", True):
            log.info("iteration %d: the evaluation networks trained with S's learned step size %.4g", it,
                     float(syn.lr.detach()))
        return {**res, **extra}

    from tqdm.auto import tqdm

    def is_eval_step(it: int) -> bool:
        return it == iterations or (it % eval_every == 0 and (it > 0 or bool(cfg.eval_at_start)))

    checkpoint_every = int(cfg.checkpoint_every)
    bar = tqdm(range(start, iterations + 1), initial=start, total=iterations + 1, desc="distill", disable=None)
    try:
        for it in bar:
            final = it == iterations
            pending_eval = is_eval_step(it) and evaluated_at != it
            if pending_eval or (it == start and ckpt is None) or (it > start and it % checkpoint_every == 0):
                checkpoint(it)
            if stop.pending is not None:  # a stop signal arrived: save the state of `it`, then stop
                if saved_at[0] != it:
                    checkpoint(it)
                stop.stop(it, ckpt_path)
            if pending_eval:
                with stop.interruptible(it, ckpt_path):  # the checkpoint is current: a signal stops at once
                    result = evaluate_and_log(it, loss_val)
                evaluated_at = it
                checkpoint(it)
                if result is not None and "acc_mean" in result:
                    last_acc = result["acc_mean"]
                    bar.set_postfix(loss=loss_val, acc=f"{last_acc:.2f}")
            if final:
                break
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(derive_seed(seed, 2, it))
            net = fetcher.fetch(it)
            for step in range(int(fetcher.outer_loop)):
                if step > 0:
                    net = fetcher.update(net, syn, real, g)
                loss = objective(syn, real, net, it, g)
                if not torch.isfinite(loss):
                    raise DdrunError(f"the loss became {loss.item()} at iteration {it}; stopped, the last good "
                                     f"checkpoint (iteration {saved_at[0]}) is kept at {ckpt_path}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            fetcher.release(net, syn, real, g)  # after the last update with this net (FRePo's pool trains it)
            objective.check(syn, it)
            loss_val = loss.item()
            elapsed += time.perf_counter() - t0
            bad = [name for name, p in syn.named_parameters() if not torch.isfinite(p).all()]
            if bad:
                raise DdrunError(f"S ({', '.join(bad)}) became NaN/Inf at iteration {it}; stopped, the last good "
                                 f"checkpoint (iteration {saved_at[0]}) is kept at {ckpt_path}")
            bar.set_postfix(loss=f"{loss_val:.4g}", acc=None if last_acc is None else f"{last_acc:.2f}")
            if (it + 1) % int(cfg.log_every) == 0 and not is_eval_step(it + 1):
                tracker.log({"loss": loss_val, "seconds": elapsed}, it + 1)
        syn.meta["iteration"] = iterations
        syn.save(run_dir / "synthetic.pt")
    finally:
        bar.close()
        tracker.close()
    out = {"run_dir": str(run_dir), "synthetic": str(run_dir / "synthetic.pt")}
    if result is not None:
        out.update(result)
    return out


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

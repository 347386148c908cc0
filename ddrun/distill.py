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
import logging
import math
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ddrun.checkpoint import atomic_save, load_checkpoint
from ddrun.utils import ConfigError, DdrunError, build, derive_seed, resolve_device, seed_everything

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
              "device", "hydra"):
        c.pop(k, None)
    return hashlib.sha1(OmegaConf.to_yaml(OmegaConf.create(c)).encode()).hexdigest()[:12]


def distill(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run one distillation described by ``cfg`` into ``run_dir``.

    Writes ``synthetic.pt``, ``images/*.png``, ``metrics.jsonl`` and ``checkpoint.pt`` (resumed from when present
    and ``resume`` is true).

    Returns:
        ``{"acc_mean", "acc_std", "per_net", "protocol", "run_dir", "synthetic"}`` of the final evaluation
        (accuracies in percent), or without the accuracies when ``evaluator.num_eval=0``.

    Raises:
        ConfigError, DataError: bad configuration or data (one-line messages).
        DdrunError: the loss became NaN/Inf (the last good checkpoint is kept).
    """
    from ddrun.tracking import Tracker

    validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    seed = int(cfg.seed)
    seed_everything(seed)
    chash = config_hash(cfg)

    real = build(cfg.dataset).to(device)
    ipc = int(cfg.ipc)
    syn = build(cfg.init)(real, ipc, torch.Generator().manual_seed(derive_seed(seed, 1)))
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
    ckpt_path = run_dir / "checkpoint.pt"

    start, elapsed, wandb_id = 0, 0.0, None
    ckpt = load_checkpoint(ckpt_path) if cfg.resume else None
    if ckpt is not None and ckpt.get("config_hash") != chash:
        raise ConfigError(f"{ckpt_path} was written by a run with another configuration "
                          f"(hash {ckpt.get('config_hash')} != {chash}); use another run directory or resume=false")
    if ckpt is not None:
        syn.load_state(ckpt["syn"])
        start, elapsed, wandb_id = int(ckpt["iteration"]), float(ckpt["seconds"]), ckpt.get("wandb_id")
        fetcher.load_state_dict(ckpt.get("fetcher", {}))
        log.info("resuming from %s at iteration %d", ckpt_path, start)

    optimizer = build(cfg.syn_optimizer)(objective.param_groups(syn), lr=objective.lr_img)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])

    tracker = Tracker(run_dir, OmegaConf.to_container(cfg, resolve=True), resume_id=wandb_id,
                      **OmegaConf.to_container(cfg.logger, resolve=True))
    iterations, eval_every = int(cfg.iterations), int(cfg.eval_every)
    if evaluator is not None:
        log.info("evaluation protocol: %s", evaluator.protocol())

    def save_checkpoint(next_it: int) -> None:
        atomic_save({"iteration": next_it, "seconds": elapsed, "syn": syn.state(), "optimizer": optimizer.state_dict(),
                     "fetcher": fetcher.state_dict(), "config_hash": chash, "wandb_id": tracker.run_id}, ckpt_path)

    def evaluate_and_log(it: int, loss: float | None) -> dict | None:
        tracker.images(real.to_pixels(syn.images.detach()), ipc, it)
        if evaluator is None:
            return None
        res = evaluator(syn, real, seed)
        tracker.log({"loss": loss, "acc_mean": res["acc_mean"], "acc_std": res["acc_std"], "seconds": elapsed}, it)
        log.info("iteration %d: accuracy %.2f +- %.2f (%s)", it, res["acc_mean"], res["acc_std"], res["protocol"])
        return res

    from tqdm.auto import tqdm

    def is_eval_step(it: int) -> bool:
        return it == iterations or (it % eval_every == 0 and (it > 0 or bool(cfg.eval_at_start)))

    result, last_acc, loss_val = None, None, None
    bar = tqdm(range(start, iterations + 1), initial=start, total=iterations + 1, desc="distill", disable=None)
    try:
        for it in bar:
            final = it == iterations
            if is_eval_step(it):
                result = evaluate_and_log(it, loss_val)
                if result is not None:
                    last_acc = result["acc_mean"]
                    bar.set_postfix(loss=loss_val, acc=f"{last_acc:.2f}")
                save_checkpoint(it)
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
                    raise DdrunError(f"the loss became {float(loss)} at iteration {it}; stopped, the last good "
                                     f"checkpoint is kept at {ckpt_path}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            objective.check(syn, it)
            loss_val = loss.item()
            elapsed += time.perf_counter() - t0
            if not torch.isfinite(syn.images).all():
                raise DdrunError(f"S became NaN/Inf at iteration {it}; stopped, the last good checkpoint is kept "
                                 f"at {ckpt_path}")
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

    try:
        out = distill(cfg, HydraConfig.get().runtime.output_dir)
    except DdrunError as exc:
        log.error("%s", exc)
        print(f"ddrun distill: error: {exc}", file=sys.stderr)
        sys.exit(1)
    acc = out.get("acc_mean")
    if acc is not None:
        print(f"final accuracy {acc:.2f} +- {out['acc_std']:.2f} ({out['protocol']})")
    print(f"results in {out['run_dir']} (synthetic.pt, images/, metrics.jsonl, wandb/)")
    return None if acc is None or math.isnan(acc) else acc

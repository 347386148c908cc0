"""``ddrun teacher``: train teacher networks on the real training set and store them (the "squeeze" stage).

SRe2L (Yin et al., NeurIPS 2023, Sec. 3.1 "squeeze"), RDED (Sun et al., CVPR 2024: the observer) and EDC (Shao et
al., NeurIPS 2024, Sec. A.2: a pool of backbones) all start from classifiers trained on the full real set. A
teacher here is one network (``net``) trained with one *recipe* (``conf/recipe/<name>.yaml``: SGD with momentum,
step size, weight decay, batch, epochs, cosine or constant schedule with optional linear warm-up, per-sample
RandomCrop / RandomResizedCrop + flip from ``torchvision.transforms.v2``), stored whole: the ``state_dict`` with the
BatchNorm running statistics that ``objective=statistics`` matches, the recipe, the test accuracy and a digest.

The teachers are the ``teachers`` collection of the artefact store (:mod:`ddrun.store`), keyed by dataset, net
and recipe name: ``<paths.buffers>/teachers/<dataset>/<net key>/<recipe>/teacher_0000.pt``. Teacher ``i`` starts
from ``derive_seed(seed, 7013, i)`` and epoch ``e`` draws its shuffle and augmentation from ``derive_seed(seed,
7013, i, e)``, so ``teacher_offset`` shards (``ddrun teacher -m teacher_offset=0,1,2,3``, a SLURM array with
``hydra/launcher=slurm``) write disjoint teachers of one pool, each teacher in training is claimed (a lock file)
so two jobs never train it twice, and a killed job resumes the half-trained teacher from its last finished epoch
(``teacher_0000.partial/state.pt``: weights, BatchNorm buffers, optimizer and scheduler) to the same weights as an
uninterrupted run (bitwise on the CPU).
"""

from __future__ import annotations

import logging
import math
import shutil
import statistics
import time
from collections.abc import Callable

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ddrun import speed
from ddrun.files import atomic_save, safe_load
from ddrun.schema import check_common
from ddrun.store import Collection, command_for, teacher_payload, teacher_setting
from ddrun.utils import ConfigError, DataError, DdrunError, build, command_errors, derive_seed, resolve_device, \
    host_to, seed_everything

log = logging.getLogger("ddrun.teacher")

SEED_TAG = 7013


def recipe_of(cfg: DictConfig) -> dict:
    """The resolved recipe as plain values (the collection manifest's ``training``), with the seed."""
    recipe = OmegaConf.to_container(cfg.recipe, resolve=True)
    recipe.pop("per_dataset", None)
    recipe["seed"] = int(cfg.seed)
    return recipe


def _check(cfg: DictConfig, recipe: dict) -> None:
    """The command's checks before any work: the schema's (types, ranges, known keys, device, logger) and the
    recipe's values."""
    check_common(cfg, "teacher")
    for key in ("epochs", "batch"):
        if int(recipe[key]) < 1:
            raise ConfigError(f"recipe.{key}={recipe[key]}: must be >= 1")
    if float(recipe["lr"]) <= 0:
        raise ConfigError(f"recipe.lr={recipe['lr']}: must be > 0")
    if recipe["schedule"] not in ("cosine", "constant"):
        raise ConfigError(f"recipe.schedule={recipe['schedule']!r}: valid values are ['cosine', 'constant']")
    if not 0 <= int(recipe["warmup_epochs"]) < int(recipe["epochs"]):
        raise ConfigError(f"recipe.warmup_epochs={recipe['warmup_epochs']}: must be in [0, recipe.epochs)")


def lr_factor(epoch: int, recipe: dict) -> float:
    """The step-size factor of ``epoch`` (0-based): linear warm-up over ``warmup_epochs`` ((e + 1) / warmup),
    then cosine to 0 at ``epochs`` (torchvision's reference ``CosineAnnealingLR`` after ``LinearLR``; SRe2L:
    ``CosineAnnealingLR(T_max=epochs)``) or constant."""
    warm, total = int(recipe["warmup_epochs"]), int(recipe["epochs"])
    if epoch < warm:
        return (epoch + 1) / warm
    if recipe["schedule"] == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - warm) / (total - warm)))


def _augment(recipe: dict, real):
    from ddrun.data.transforms import Augment

    a = recipe["augment"]
    black = [-m / s for m, s in zip(real.mean, real.std)]  # padding with black pixels, as before normalization
    return Augment(a["kind"], a["padding"], a["scale"], a["flip"], fill=black)


def train_epoch(net, opt, real, augment, batch: int, generator: torch.Generator) -> tuple[float, float]:
    """One epoch over the real training set in a shuffled order with per-sample augmentation; returns the mean
    cross-entropy and the training accuracy in percent (on the augmented batches)."""
    net.train()
    x_all, y_all = real.train_images, real.train_labels
    order = host_to(torch.randperm(len(x_all), generator=generator), x_all.device)
    total, correct = 0.0, 0
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        x, y = augment(x_all[idx], generator), y_all[idx]
        out = net(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
        correct += int((out.argmax(1) == y).sum())
    return total / len(order), 100.0 * correct / len(order)


def _resume(partial, net, opt, sched) -> tuple[int, float, float | None]:
    """Load ``partial/state.pt`` into net / optimizer / scheduler; returns ``(epochs done, seconds, last test
    accuracy)`` ((0, 0, None) when there is none; an unreadable one is removed)."""
    path = partial / "state.pt"
    if not path.is_file():
        return 0, 0.0, None
    try:
        state = safe_load(path, "teacher resume point")
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    except (DataError, KeyError, RuntimeError) as exc:
        log.warning("teacher resume point %s is unusable (%s); starting that teacher again", path, exc)
        path.unlink(missing_ok=True)
        return 0, 0.0, None
    return int(state["epoch"]), float(state["seconds"]), state.get("test_acc")


def train_teacher(index: int, store: Collection, real, net_factory: Callable, recipe: dict, device: torch.device,
                  test_every: int = 10) -> dict:
    """Train teacher ``index`` (resuming from its ``.partial/`` folder), store it, return its manifest entry."""
    from tqdm.auto import tqdm

    from ddrun.nets import build_net
    from ddrun.train import accuracy

    seed, epochs = int(recipe["seed"]), int(recipe["epochs"])
    net = build_net(net_factory, real, derive_seed(seed, SEED_TAG, index), device)
    opt = torch.optim.SGD(net.parameters(), lr=float(recipe["lr"]), momentum=float(recipe["momentum"]),
                          weight_decay=float(recipe["weight_decay"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(e, recipe))
    partial = store.partial_dir(index)
    partial.mkdir(parents=True, exist_ok=True)
    start, seconds, test_acc = _resume(partial, net, opt, sched)
    if start:
        log.info("teacher %d: resuming after epoch %d", index, start)
    augment, t0 = _augment(recipe, real), time.perf_counter()
    bar = tqdm(range(start, epochs), initial=start, total=epochs, desc=f"teacher {index}", disable=None)
    for e in bar:
        g = torch.Generator().manual_seed(derive_seed(seed, SEED_TAG, index, e))
        loss, train_acc = train_epoch(net, opt, real, augment, int(recipe["batch"]), g)
        if not math.isfinite(loss):
            raise DdrunError(f"teacher {index}: the training loss became {loss} in epoch {e + 1}; lower recipe.lr "
                             f"(now {recipe['lr']})")
        sched.step()
        if (e + 1) % test_every == 0 or e + 1 == epochs:
            test_acc = 100.0 * accuracy(net, real.test_images, real.test_labels)
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{train_acc:.1f}",
                        test="-" if test_acc is None else f"{test_acc:.2f}")
        log.info("teacher %d epoch %d/%d: loss %.4f, train accuracy %.2f%% (augmented), test accuracy %s", index,
                 e + 1, epochs, loss, train_acc, "-" if test_acc is None else f"{test_acc:.2f}%")
        atomic_save({"epoch": e + 1, "net": net.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "seconds": seconds + time.perf_counter() - t0,
                     "test_acc": test_acc}, partial / "state.pt")
    bar.close()
    seconds += time.perf_counter() - t0
    test_acc = 100.0 * accuracy(net, real.test_images, real.test_labels)
    entry = store.put(index, teacher_payload(net, index, epochs, test_acc, store.setting, recipe),
                      {"epochs": epochs, "test_acc": round(test_acc, 4), "seconds": round(seconds, 2),
                       "params": int(sum(p.numel() for p in net.parameters()))})
    shutil.rmtree(partial, ignore_errors=True)
    log.info("teacher %d: test accuracy %.2f%% after %d epochs (%.0f s, %.1f MB)", index, test_acc, epochs, seconds,
             entry["bytes"] / 1e6)
    return entry


def teacher(cfg: DictConfig) -> dict:
    """Train and store the teachers ``teacher_offset .. teacher_offset + num_teachers - 1`` of the collection
    ``cfg`` describes (module doc); finished ones are skipped, half-trained ones resumed, ones another job is
    training are waited for at the end.

    Returns:
        ``{"dir": str, "trained": [indices], "skipped": [indices], "teachers": {index: manifest entry}}`` where
        ``teachers`` holds every finished teacher of the collection (from all shards).

    Raises:
        ConfigError: bad settings, or the directory holds teachers trained with another recipe (names what
            differs).
        DataError: dataset problems (from the loader).
        DdrunError: the training loss became NaN/Inf.
    """
    recipe = recipe_of(cfg)
    _check(cfg, recipe)
    device = resolve_device(cfg.device)
    speed.configure(None, bool(cfg.deterministic))
    seed_everything(int(cfg.seed))
    real = build(cfg.dataset).to(device)
    net_factory = build(cfg.net)
    store = Collection(cfg.paths.buffers, "teachers", teacher_setting(real, net_factory, recipe["name"]))
    store.open_for_writing(recipe, command_for("teachers", store.setting, cfg.paths.buffers, cfg.paths.data,
                                               training=recipe))
    indices = list(range(int(cfg.teacher_offset), int(cfg.teacher_offset) + int(cfg.num_teachers)))
    log.info("teachers %s: %d..%d, recipe %s, %d epochs each", store.dir, indices[0], indices[-1], recipe["name"],
             recipe["epochs"])

    def train(index: int) -> dict:
        return train_teacher(index, store, real, net_factory, recipe, device, int(cfg.test_every))

    done = store.fill(indices, train)
    return {"dir": str(store.dir), "trained": done["trained"], "skipped": done["skipped"],
            "teachers": store.entries()}


@hydra.main(version_base="1.3", config_path="pkg://ddrun.conf", config_name="teacher")
def main(cfg: DictConfig) -> None:
    with command_errors("teacher", log):
        out = teacher(cfg)
    t = out["teachers"]
    accs = [e["test_acc"] for e in t.values()]
    acc = f"{statistics.fmean(accs):.2f} +- {statistics.pstdev(accs):.2f}" if accs else "-"
    print(f"teachers {out['dir']}: {len(t)} teachers ({len(out['trained'])} trained now, {len(out['skipped'])} "
          f"already there); test accuracy {acc} %")

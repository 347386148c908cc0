"""DD's own evaluation protocol: replay the learned steps from theta_0.

Wang, Zhu, Torralba & Efros, "Dataset Distillation" (2018), Sec. 3-4: a distilled set is a *training procedure*,
the images of S in ``syn_steps`` batches and one learned step size per step; its accuracy is that of the network
obtained by exactly those steps (``syn_steps x syn_epochs`` plain gradient steps, ``ddrun.objectives.meta.replay``)
from the initialization it was distilled for, e.g. "10 distilled images train a fixed-init LeNet to 94%" (the
reference README), not of a network trained on S for many epochs with another optimizer.

theta_0 is drawn as the distillation's fetcher draws it (``ddrun.contracts.NET_SEED_TAG``): ``init: fixed`` is the
fixed initialization of ``fetcher=fixed`` itself (the same network for the same ``seed``: the paper's known-init
setting); ``init: random`` draws ``num_eval`` held-out networks from p(theta_0) that the run never trained on
(``fetcher=random``: the unknown-init setting); ``init: pretrained`` replays from the held-out networks of
``fetcher=pretrained``'s pool (Sec. 3.4-3.5, adaptation and poisoning: networks pretrained on a source dataset that
the run never trained with). ``init: auto`` picks by the run's fetcher.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch
from torch import nn

from ddrun.contracts import NET_SEED_TAG
from ddrun.contracts import Evaluator as EvaluatorContract
from ddrun.data.datasets import RealData
from ddrun.nets import build_net
from ddrun.nets.functional import forward
from ddrun.objectives.meta import replay, require_steps
from ddrun.protocol import net_kwargs, net_name
from ddrun.synthetic import SyntheticSet
from ddrun.utils import ConfigError, derive_seed


def describe_net(name: str, kwargs: dict | None) -> str:
    """``dd_net(init xavier)``: a network as S's meta records it."""
    return name + ("(" + ", ".join(f"{k} {v}" for k, v in sorted(kwargs.items())) + ")" if kwargs else "")


def net_overrides(name: str, kwargs: dict | None) -> str:
    """The overrides that build the network ``name`` with ``kwargs``: ``net=<config>`` (the ``conf/net`` file whose
    target builds ``name``, the one with the fewest differing keys) and ``net.<key>=<value>`` for each keyword
    that file does not set to the recorded value."""
    from pathlib import Path

    from omegaconf import OmegaConf

    import ddrun.conf

    kwargs = dict(kwargs or {})
    best = None
    for path in sorted((Path(ddrun.conf.__file__).parent / "net").glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path))
        if str(node.get("_target_", "")).rsplit(".", 1)[-1].lower() != name:
            continue
        differ = [f"net.{k}={v}" for k, v in sorted(kwargs.items()) if node.get(k) != v]
        differ += [f"~net.{k}" for k in sorted(node) if not k.startswith("_") and k not in kwargs]
        if best is None or len(differ) < len(best):
            best = [f"net={path.stem}", *differ]
    return " ".join(best) if best else f"the net S was distilled with ({describe_net(name, kwargs)})"


INITS = ("auto", "fixed", "random", "pretrained")
FETCHER_INITS = {"FixedFetcher": "fixed", "PretrainedFetcher": "pretrained"}  # else: draws from p(theta_0)
NEEDS = {"fixed": "the one fixed theta_0 of fetcher=fixed", "pretrained": "the held-out networks of "
         "fetcher=pretrained's pool"}


def resolve_init(init: str, fetcher: str | None, key: str = "evaluator") -> str:
    """The replay's theta_0 kind for ``init`` given the run's fetcher ``_target_`` (None: not a distill run, e.g.
    ``ddrun evaluate``): ``auto`` becomes ``fixed`` / ``pretrained`` / ``random`` by the fetcher. ``fixed`` and
    ``pretrained`` need the fetcher of that kind: from another one S was never distilled for that theta_0 (with
    fetcher=random the "fixed theta_0" is a network the run never used; the pretrained pool is not built at all).
    ``random`` (held-out draws from p(theta_0)) goes with any fetcher.

    Raises:
        ConfigError: one line naming ``<key>.init``: an unknown value, ``auto`` without a fetcher, or ``fixed`` /
            ``pretrained`` with a fetcher of another kind (and the overrides that fit).
    """
    if init not in INITS:
        raise ConfigError(f"{key}.init={init!r}: valid values are {list(INITS)}")
    kind = None if fetcher is None else FETCHER_INITS.get(str(fetcher).rsplit(".", 1)[-1], "random")
    if init == "auto":
        if kind is None:
            raise ConfigError(f"{key}.init=auto needs the run's fetcher: pass {key}.init=fixed (S was "
                              f"distilled with fetcher=fixed) or {key}.init=random")
        return kind
    if kind is not None and init in NEEDS and kind != init:
        raise ConfigError(f"{key}.init={init} replays S's steps from {NEEDS[init]}, but S is distilled with "
                          f"{str(fetcher).rsplit('.', 1)[-1]}, not for that network: pass {key}.init={kind}, or "
                          f"distill with fetcher={init}")
    return init


class ReplayEvaluator(EvaluatorContract):
    """DD's protocol (module doc): accuracy (percent, whole real test split) of theta_0 after S's learned steps.

    Args:
        net: factory of the distilled-for network (the run's ``net``).
        init: ``fixed``, ``random``, ``pretrained`` or ``auto`` (``fixed`` when ``fetcher`` names
            ``FixedFetcher``, ``pretrained`` when it names ``PretrainedFetcher``, else ``random``).
        fetcher: the run's fetcher ``_target_`` (for ``init: auto``), or None.
        num_eval: held-out networks with ``init: random`` (``fixed`` replays the one theta_0; ``pretrained`` at
            most the pool's ``held_out`` networks, each once).
        pool: with ``init: pretrained``, the run's ``fetcher`` config (a partial ``PretrainedFetcher``), built in
            :meth:`prepare`.
        syn_steps: the batches S was split into (the DD objective's ``syn_steps``); None: read from S's meta.
        epochs: ignored (the replay runs exactly S's steps); accepted so overrides shared by every evaluator, such
            as ``debug=smoke``'s ``evaluator.epochs``, apply.
        name: the architecture's name in ``per_net``.

    Raises:
        ConfigError: an unknown ``init``; ``init: auto`` without a fetcher; ``init: fixed`` / ``pretrained`` with
            a fetcher of another kind (:func:`resolve_init`); ``init: pretrained`` without the pool (at
            construction); at evaluation: S holds no DD steps (not a DD set); no ``syn_steps`` known; with
            ``init: fixed``, a ``seed`` or ``net`` other than the ones S's meta records (the fixed theta_0 would
            be another network).
    """

    def __init__(self, net: Callable[..., nn.Module], init: str = "auto", fetcher: str | None = None,
                 num_eval: int = 1, syn_steps: int | None = None, epochs: int | None = None, name: str = "net",
                 pool: Callable | None = None):
        init = resolve_init(init, fetcher)
        if init == "pretrained" and pool is None:
            raise ConfigError("evaluator.init=pretrained replays from the held-out networks of fetcher=pretrained's "
                              "pool: distill with fetcher=pretrained")
        self.net_factory, self.init, self.name, self.pool = net, init, name, pool
        self._pool = None
        self.num_eval = 1 if init == "fixed" and int(num_eval) > 0 else int(num_eval)
        self.syn_steps = None if syn_steps is None else int(syn_steps)
        self.uses_learned_lr = True

    def protocol_fields(self) -> dict:
        return {"evaluator": "replay", "archs": [self.name], "nets": {self.name: net_kwargs(self.net_factory)},
                "num_eval": self.num_eval, "epochs": "S's learned steps", "optimizer": "gd",
                "lr": "learned per step", "lr_schedule": "learned", "momentum": 0, "weight_decay": 0,
                "batch": f"{self.syn_steps or 'syn_steps'} batches of S", "augment": "none", "learned_lr": True,
                "labels": "as stored", "theta0": {"fixed": "the fixed theta_0 of the run",
                                                  "pretrained": "held-out networks of the pretrained pool"}.get(
                    self.init, "held-out draws from p(theta_0)")}

    def prepare(self, real: RealData) -> None:
        """With ``init: pretrained``: the pool (its store collection, held-out networks last), so a missing pool
        stops the run at start-up (DataError naming the ``ddrun teacher`` command)."""
        if self.init == "pretrained" and self._pool is None:
            self._pool = self.pool(real=real, device=real.device, seed=0)
            self.num_eval = min(self.num_eval, len(self._pool.held_ids))

    def theta0(self, real: RealData, seed: int, r: int) -> nn.Module:
        """Network ``r``: the run's fixed theta_0, held-out pretrained network ``r``, or held-out draw ``r``
        (``Fetcher.held_out``)."""
        if self.init == "pretrained":
            self.prepare(real)
            return self._pool.held_out(r)
        s = derive_seed(seed, NET_SEED_TAG) if self.init == "fixed" else derive_seed(seed, NET_SEED_TAG, -1 - r)
        return build_net(self.net_factory, real, s, real.device)

    def check_theta0(self, syn: SyntheticSet, seed: int) -> None:
        """With ``init: fixed``: refuse S distilled with a fetcher other than ``fetcher=fixed`` (S's meta
        ``fetcher``), or a ``seed`` or a network other than the run's (S's meta ``seed``, ``net``, ``net_kwargs``;
        a file without them is not checked), which would replay S's steps from another theta_0.

        Raises:
            ConfigError: one line naming what differs and the override that gives the run's theta_0.
        """
        if self.init != "fixed":
            return
        meta = syn.meta
        if meta.get("fetcher") is not None:  # S distilled with another fetcher has no fixed theta_0
            resolve_init(self.init, meta["fetcher"])
        if meta.get("seed") is not None and int(meta["seed"]) != int(seed):
            raise ConfigError(f"evaluator.init=fixed: S was distilled from the fixed theta_0 of seed {meta['seed']}, "
                              f"not seed={seed}: pass seed={meta['seed']}")
        made = (meta.get("net"), meta.get("net_kwargs"))
        have = (net_name(self.net_factory), net_kwargs(self.net_factory))
        if made[0] is None or (made[0] == have[0] and (made[1] is None or dict(made[1]) == have[1])):
            return
        want = describe_net(*made)
        raise ConfigError(f"evaluator.init=fixed: S was distilled from the fixed theta_0 of {want}, not of "
                          f"{describe_net(*have)}: pass {net_overrides(*made)}")

    def replayed(self, syn: SyntheticSet, real: RealData, net: nn.Module) -> dict[str, torch.Tensor]:
        """The parameters of ``net`` after S's steps."""
        require_steps(syn)
        syn_steps = self.syn_steps if self.syn_steps is not None else syn.meta.get("syn_steps")
        if syn_steps is None:
            raise ConfigError("S does not record how many batches its steps use: pass evaluator.syn_steps=N "
                              "(the objective.syn_steps it was distilled with)")
        return replay(net, syn, int(syn_steps))

    @torch.no_grad()
    def test_accuracy(self, net: nn.Module, params: dict[str, torch.Tensor], real: RealData) -> float:
        net.eval()
        correct = 0
        for s in range(0, len(real.test_images), 1000):
            out = forward(net, params, real.test_images[s:s + 1000])
            correct += int((out.argmax(1) == real.test_labels[s:s + 1000]).sum())
        return 100.0 * correct / max(len(real.test_images), 1)

    def __call__(self, syn: SyntheticSet, real: RealData, seed: int = 0) -> dict:
        """Evaluate S: ``{"acc_mean", "acc_std", "per_net", "protocol", "protocol_fields"}`` (percent)."""
        self.check_theta0(syn, seed)
        accs = []
        for r in range(self.num_eval):
            net = self.theta0(real, seed, r)
            accs.append(self.test_accuracy(net, self.replayed(syn, real, net), real))
        return {"acc_mean": statistics.fmean(accs), "acc_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                "per_net": {self.name: accs}, "protocol": self.protocol(), "protocol_fields": self.protocol_fields()}

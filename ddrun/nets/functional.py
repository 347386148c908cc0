"""Functional views of ``nn.Module`` networks for unrolled inner loops (``torch.func``).

One network definition (``ddrun.nets``) serves plain training, unrolled meta-learning (DD), trajectory matching
(MTT) and kernels: the inner loops run ``torch.func.functional_call(net, params, x)`` on a dict of parameter
tensors, so the result stays differentiable with respect to the synthetic images, labels, learned step size and
starting parameters.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.func import functional_call

from ddrun import speed
from ddrun.data.augment import DSA
from ddrun.losses import soft_cross_entropy

Params = dict[str, torch.Tensor]


def params_of(net: nn.Module, requires_grad: bool = False) -> Params:
    """A detached copy of ``net``'s parameters as an ordered ``{name: tensor}`` dict."""
    return {k: v.detach().clone().requires_grad_(requires_grad) for k, v in net.named_parameters()}


def flatten(params: Params) -> torch.Tensor:
    """Concatenate a parameter dict into one float vector ``[P]`` (in the dict's order)."""
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten(flat: torch.Tensor, like: Params | nn.Module) -> Params:
    """Split a vector ``[P]`` back into a dict shaped like ``like`` (a parameter dict or a network)."""
    shapes = {k: v.shape for k, v in (like.named_parameters() if isinstance(like, nn.Module) else like.items())}
    out, i = {}, 0
    for k, s in shapes.items():
        n = s.numel()
        out[k] = flat[i:i + n].view(s)
        i += n
    if i != flat.numel():
        raise ValueError(f"vector has {flat.numel()} entries, the network {i}")
    return out


def forward(net: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """``net(x)`` with ``params`` in place of the network's own parameters (buffers stay the network's)."""
    return functional_call(net, params, (x,))


def minibatches(n: int, batch_size: int | None, steps: int,
                generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    """``steps`` index batches over ``n`` items: a fresh random permutation each pass, cut into ``batch_size``
    chunks (all ``n`` when None), as MTT's ``batch_syn`` (Cazenavette et al. 2022, ``distill.py``)."""
    b = n if not batch_size else min(batch_size, n)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < b:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        idx, order = order[:b], order[b:]
        yield idx


def sgd_step(net: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, lr: torch.Tensor | float,
             create_graph: bool = True) -> Params:
    """One plain SGD step ``theta - lr * grad l(theta; x, y)`` (soft or hard labels), differentiable w.r.t.
    ``params``, ``x``, ``y`` and ``lr`` when ``create_graph``. On the CPU the gradient is accumulated over
    cache-sized chunks of the batch (:func:`_chunks`)."""
    params = {k: p if p.requires_grad else p.detach().requires_grad_(True) for k, p in params.items()}
    grads = None
    for xc, yc, w in _chunks(net, x, y):  # cache-sized pieces on the CPU (the same gradient up to rounding)
        loss = soft_cross_entropy(forward(net, params, xc), yc)
        gs = torch.autograd.grad(loss * w if w != 1.0 else loss, list(params.values()), create_graph=create_graph)
        grads = gs if grads is None else [a + b for a, b in zip(grads, gs)]
    return {k: p - lr * g for (k, p), g in zip(params.items(), grads)}


Plan = list[tuple[torch.Tensor, "int | None"]]


def sgd_plan(n: int, batch_size: int | None, steps: int, generator: torch.Generator | None,
             augment: DSA | None = None) -> Plan:
    """The random draws of an unrolled inner loop, made up front: for each of ``steps`` SGD steps, the minibatch
    indices (int64, see :func:`minibatches`) and the seed of its per-sample DSA draw (None without DSA). A plan
    replays exactly, which the memory-efficient gradient needs (it recomputes every step in its backward)."""
    aug = augment is not None and augment.enabled
    return [(idx, int(torch.randint(2**62, (1,), generator=generator)) if aug else None)
            for idx in minibatches(n, batch_size, steps, generator)]


def plan_batch(images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, seed: int | None,
               augment: DSA | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The minibatch ``(x, y)`` of one plan step: ``images[idx]`` through per-sample DSA drawn from ``seed``."""
    idx = idx.to(images.device)
    x = images[idx]
    if seed is not None:
        x = augment(x, torch.Generator().manual_seed(seed))
    return x, labels[idx]


def unroll_sgd(net: nn.Module, params: Params, images: torch.Tensor, labels: torch.Tensor,
               lr: torch.Tensor | float, steps: int, batch_size: int | None = None, augment: DSA | None = None,
               generator: torch.Generator | None = None, plan: Plan | None = None, memory_budget: int | None = None,
               knobs: str = "") -> Params:
    """``steps`` SGD steps from ``params`` on minibatches of ``(images, labels)`` (see :func:`sgd_plan`; pass
    ``plan`` to replay given draws), each minibatch passed through per-sample DSA when ``augment`` is set: the
    plan's batches run through :func:`unroll_steps` with one step size ``lr``. Returns the final parameters, whose
    graph reaches ``images``, ``labels``, ``lr`` and the starting ``params`` (memory grows linearly with
    ``steps``: every step's double-backward graph is kept). ``memory_budget`` / ``knobs``: as
    :func:`unroll_steps` (a one-line DdrunError before the unroll outgrows the budget).

    Raises:
        DdrunError: the unroll would exceed ``memory_budget``.
    """
    if plan is None:
        plan = sgd_plan(len(images), batch_size, steps, generator, augment)
    batches = [(*plan_batch(images, labels, idx, seed, augment), lr) for idx, seed in plan]
    return unroll_steps(net, params, batches, memory_budget=memory_budget, knobs=knobs)


def unroll_sgd_memory_efficient(net: nn.Module, params: Params, images: torch.Tensor, labels: torch.Tensor,
                                lr: torch.Tensor | float, steps: int, batch_size: int | None = None,
                                augment: DSA | None = None, generator: torch.Generator | None = None,
                                plan: Plan | None = None) -> Params:
    """:func:`unroll_sgd` with the same value and the same gradient, in memory independent of ``steps``.

    The constant-memory unrolled gradient of TESLA (Cui et al., "Scaling Up Dataset Distillation to ImageNet-1K
    with Constant Memory", ICML 2023, Sec. 4.1): the forward pass keeps no graph, only the parameter vectors
    ``theta_0 .. theta_{N-1}`` (N x P floats, e.g. 1.3 MB per step for the CIFAR-10 ConvNet); the backward pass
    recomputes one step at a time, newest first, and carries the adjoint ``a_i = dL/dtheta_i`` through
    ``theta_{i+1} = theta_i - lr * g_i(theta_i, x_i)``:

        dL/dx_i  += -lr * (dg_i/dx_i)^T a_{i+1}      dL/dlr += -a_{i+1} . g_i
        a_i       = a_{i+1} - lr * H_i a_{i+1}       (H_i the Hessian of step i's loss)

    one double-backward per step, so peak memory is one step's graph. TESLA's released code uses the final
    ``a_N`` for every step (it drops the ``H_i a`` terms); carrying the adjoint makes the result *exactly* the
    plain unrolled gradient (tests/test_mtt.py checks both agree to float tolerance). Gradients reach
    ``images``, ``labels`` (when floating point and requiring grad), ``lr`` and the starting ``params``.
    """
    if plan is None:
        plan = sgd_plan(len(images), batch_size, steps, generator, augment)
    if not plan:
        raise ValueError("unroll_sgd_memory_efficient needs at least one step")
    names = list(params)
    lr_t = lr if isinstance(lr, torch.Tensor) else torch.tensor(float(lr), device=images.device)
    out = _ReplayedSGD.apply(net, plan, augment, names, images, labels, lr_t, *params.values())
    return dict(zip(names, out))


def _chunks(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """``(x_c, y_c, len(x_c) / len(x))`` pieces of one step's batch: cache-sized on the CPU for a batch-independent
    ``net`` (:func:`ddrun.speed.chunk_size`), else the whole batch. The step's mean loss is the weighted sum of the
    pieces' mean losses, so its gradient is too."""
    n = speed.chunk_size(x)
    if n is None or n >= len(x) or not speed.batch_independent(net):
        return [(x, y, 1.0)]
    return [(xc, yc, len(xc) / len(x)) for xc, yc in zip(x.split(n), y.split(n))]


class _ReplayedSGD(torch.autograd.Function):
    """Autograd node of :func:`unroll_sgd_memory_efficient` (forward without graph, backward by replay). Each step's
    work runs in :func:`_chunks` of its batch; the backward replays one chunk at a time (the adjoint's update is a
    sum over chunks), so its peak memory is one chunk's double-backward graph."""

    @staticmethod
    def _chunk_grads(net, names, theta, x, y, weight, create_graph):
        loss = soft_cross_entropy(forward(net, dict(zip(names, theta)), x), y)
        return torch.autograd.grad(loss * weight if weight != 1.0 else loss, theta, create_graph=create_graph,
                                   allow_unused=True)

    @staticmethod
    def forward(ctx, net, plan, augment, names, images, labels, lr, *params0):
        theta = [p.detach() for p in params0]
        thetas = []
        lr_d = lr.detach()
        with torch.enable_grad():
            for idx, seed in plan:
                thetas.append(theta)
                x, y = plan_batch(images.detach(), labels.detach(), idx, seed, augment)
                t = [p.detach().requires_grad_(True) for p in theta]
                grads = None
                for xc, yc, w in _chunks(net, x, y):
                    gs = _ReplayedSGD._chunk_grads(net, names, t, xc, yc, w, False)
                    grads = gs if grads is None else [a if b is None else (b if a is None else a + b)
                                                      for a, b in zip(grads, gs)]
                theta = [p.detach() if g is None else p.detach() - lr_d * g for p, g in zip(t, grads)]
        ctx.net, ctx.plan, ctx.augment, ctx.names, ctx.thetas = net, plan, augment, names, thetas
        ctx.save_for_backward(images, labels, lr)
        return tuple(theta)

    @staticmethod
    def _replay_step(ctx, theta, a, idx, seed, need_img, need_lab, images, labels):
        """One step of the backward: ``(a . g_i, d(a . g_i)/dtheta_i, d/dimages, d/dlabels)``. Each chunk's
        double-backward reaches its piece of the (augmented) batch; the augmentation is differentiated once."""
        with torch.enable_grad():
            img = images.detach().requires_grad_(bool(need_img))
            lab = labels.detach().requires_grad_(bool(need_lab))
            x, y = plan_batch(img, lab, idx, seed, ctx.augment)
            t = [p.detach().requires_grad_(True) for p in theta]
            dot_total, h_total, gx, gy = 0.0, [None] * len(t), [], []
            for xc, yc, w in _chunks(ctx.net, x, y):
                grads = _ReplayedSGD._chunk_grads(ctx.net, ctx.names, t, xc, yc, w, True)
                dot = sum((g * ai).sum() for g, ai in zip(grads, a) if g is not None)
                inputs = t + ([xc] if need_img else []) + ([yc] if need_lab else [])
                vjp = torch.autograd.grad(dot, inputs, allow_unused=True, retain_graph=need_img or need_lab)
                dot_total = dot_total + dot.detach()
                h_total = [u if v is None else (v if u is None else u + v) for u, v in zip(h_total, vjp)]
                rest = list(vjp[len(t):])
                if need_img:
                    v = rest.pop(0)
                    gx.append(torch.zeros_like(xc) if v is None else v)
                if need_lab:
                    v = rest.pop(0)
                    gy.append(torch.zeros_like(yc) if v is None else v)
            outs = ([x] if need_img else []) + ([y] if need_lab else [])
            wrt = ([img] if need_img else []) + ([lab] if need_lab else [])
            back = list(torch.autograd.grad(outs, wrt, [torch.cat(g) for g in (gx, gy) if g], allow_unused=True)) \
                if outs else []
        g_img = back.pop(0) if need_img else None
        g_lab = back.pop(0) if need_lab else None
        return dot_total, h_total, g_img, g_lab

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_out):
        images, labels, lr = ctx.saved_tensors
        need_img, need_lab, need_lr = ctx.needs_input_grad[4:7]
        need_lab = need_lab and labels.dtype.is_floating_point
        lr_d = lr.detach()
        a = [torch.zeros_like(t) if g is None else g for g, t in zip(grad_out, ctx.thetas[0])]
        g_img = torch.zeros_like(images) if need_img else None
        g_lab = torch.zeros_like(labels) if need_lab else None
        g_lr = torch.zeros_like(lr_d)
        for (idx, seed), theta in zip(reversed(ctx.plan), reversed(ctx.thetas)):
            dot, h, d_img, d_lab = _ReplayedSGD._replay_step(ctx, theta, a, idx, seed, need_img, need_lab, images,
                                                              labels)
            g_lr -= dot
            a = [ai if hi is None else ai - lr_d * hi for ai, hi in zip(a, h)]
            if d_img is not None:
                g_img -= lr_d * d_img
            if d_lab is not None:
                g_lab -= lr_d * d_lab
        params_grads = [ai if need else None for ai, need in zip(a, ctx.needs_input_grad[7:])]
        return (None, None, None, None, g_img, g_lab, g_lr if need_lr else None, *params_grads)


# ---------------------------------------------------------------------------------------------------------
# Unrolling given steps (DD) and the memory guard of unrolled inner loops
# ---------------------------------------------------------------------------------------------------------

Step = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | float"]


def unroll_steps(net: nn.Module, params: Params, steps: list[Step], truncate: int | None = None,
                 memory_budget: int | None = None, knobs: str = "") -> Params:
    """Plain gradient descent through given steps ``(x_i, y_i, lr_i)``:
    ``theta_{i+1} = theta_i - lr_i * grad_theta l(theta_i; x_i, y_i)`` (soft cross-entropy; hard or soft ``y_i``),
    the inner loop of Dataset Distillation (Wang et al. 2018, Algorithm 1, lines 6-7: each step its own batch of
    S and its own learned step size).

    Args:
        truncate: keep the double-backward graph of the last ``truncate`` steps only (truncated back-propagation
            through the unroll, Wang et al. 2018 Sec. 3.4 / Shaban et al. 2019): the earlier steps run without a
            graph and their result enters as a constant. None: back-propagate through every step.
        memory_budget: bytes. After the first differentiable step, (bytes that step saved for backward) x
            (differentiable steps) is compared with it, and a DdrunError naming ``knobs`` is raised before the
            rest of the unroll is built.

    Returns the final parameters; their graph reaches the ``x``, ``y``, ``lr`` of the kept steps and, without
    truncation, the starting ``params``.

    Raises:
        DdrunError: the unroll would exceed ``memory_budget``.
    """
    n = len(steps)
    keep = n if truncate is None else max(0, min(int(truncate), n))
    for i, (x, y, lr) in enumerate(steps):
        if i < n - keep:
            out = sgd_step(net, params, x.detach(), y.detach(), float(torch.as_tensor(lr).detach()), create_graph=False)
            params = {k: v.detach() for k, v in out.items()}
        elif i == n - keep and memory_budget is not None:
            with saved_bytes() as box:
                params = sgd_step(net, params, x, y, lr)
            check_unroll_memory(box[0], keep, memory_budget, knobs)
        else:
            params = sgd_step(net, params, x, y, lr)
    return params


class saved_bytes:
    """Context manager counting the bytes autograd saves for the backward pass inside the block: each storage
    once (a tensor saved by several operations, or views of one buffer, are one allocation), whole storages
    (what saving a view keeps alive): ``with saved_bytes() as box: ...; box[0]``."""

    def __enter__(self) -> list[int]:
        self.box = [0]
        seen: set[tuple[str, int]] = set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr())
            if key not in seen:
                seen.add(key)
                self.box[0] += storage.nbytes()
            return t

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        return self.box

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def available_memory(device: torch.device) -> int | None:
    """Bytes an unroll may still use on ``device``: free plus cached-but-unused CUDA memory, or the host's
    ``MemAvailable`` (Linux ``/proc/meminfo``) for the CPU; None where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_unroll_memory(bytes_per_step: int, steps: int, budget: int | None, knobs: str) -> None:
    """Raise a one-line DdrunError when ``steps`` differentiable steps of ``bytes_per_step`` each exceed
    ``budget`` bytes (None: no check); the message names ``knobs``, the settings that shrink the unroll."""
    from ddrun.utils import DdrunError

    need = bytes_per_step * steps
    if budget is not None and need > budget:
        raise DdrunError(f"the unrolled inner loop would keep about {need / 2**30:.2f} GiB for back-propagation "
                         f"({steps} differentiable steps x {bytes_per_step / 2**20:.1f} MiB) but only "
                         f"{budget / 2**30:.2f} GiB are available; lower {knobs}")

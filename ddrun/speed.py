"""Speed settings: how the work is laid out on the device, never what is computed.

The ``speed`` config group (``conf/speed/default.yaml``) and the top-level ``deterministic`` key. The commands
(``ddrun distill``, ``ddrun evaluate``) apply them once per process with :func:`configure`, the way torch's own
backend flags work (``torch.backends.cudnn.benchmark`` ...): they select memory layouts, batch sizes of passes
whose results do not depend on the batch, and kernels, so S and the accuracies change at most by float rounding
(``deterministic=true`` aside, which only removes run-to-run differences on a GPU). Components read them with
:func:`current`; tests and the benchmark switch them with :func:`using`.

Settings (``conf/speed/default.yaml`` documents the defaults and why):
    channels_last: NHWC memory layout for the networks of the batched paths (DM's embeddings, DC/DSA's matching,
        the evaluator ensembles): oneDNN's and cuDNN's fast convolution layout.
    cpu_chunk: on the CPU, forward passes of batch-independent networks (no BatchNorm in training mode) run in
        chunks of this many 32x32 images (scaled by image area), so the activations stay in the caches and below
        the allocator's mmap threshold; on a GPU batches stay whole.
    batched_classes: DC/DSA compute the per-class gradients of all classes in one ``torch.func.vmap`` pass
        (``auto``: on CUDA, where one class at a time is launch-bound; ``true`` / ``false`` force it).
    compile: ``torch.compile`` the evaluator's training step: each network's, or the stacked ensemble's vmapped
        forward and backward and its test pass, compiled once per architecture and process
        (``ddrun.train.Ensemble``). Off by default: the first evaluation pays the compilation (~26 s on an H200,
        20 s-1 min on a CPU), and it needs a C++ compiler / Triton; on an H200 later stacked evaluations run 1.7x
        faster (issue 12, README).
    tf32: TensorFloat-32 on Ampere+ GPUs: ``default`` (torch's: cuDNN convolutions in TF32, matmuls in float32),
        ``true`` (both), ``false`` (neither: float32 throughout, what the GPU variants of the equality tests use).
    autocast: ``none`` | ``bf16``: bfloat16 autocast of the distillation step and the evaluation (CUDA, and CPUs:
        fast where the CPU has bfloat16 instructions, AVX512-BF16 / AMX, emulated and slower elsewhere). Unlike
        the other settings it changes results beyond float rounding, so every accuracy evaluated under it says
        ``precision bf16 autocast`` in its protocol (:func:`evaluate`).
    deterministic: ``torch.use_deterministic_algorithms`` (warn-only for ops without a deterministic kernel),
        ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, cuDNN deterministic and not benchmarking: the same seed gives the same
        S on a GPU too (DSA's bilinear resampling switches to a gather-based form whose gradient is deterministic).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from ddrun.protocol import describe, with_labels
from ddrun.utils import ConfigError

log = logging.getLogger("ddrun.speed")

_CHOICES = {"batched_classes": ("auto", True, False), "tf32": ("default", True, False),
            "autocast": ("none", "bf16")}


@dataclasses.dataclass(frozen=True)
class Speed:
    """The process's speed settings (module doc)."""

    channels_last: bool = True
    cpu_chunk: int = 32
    batched_classes: str | bool = "auto"
    compile: bool = False
    tf32: str | bool = "default"
    autocast: str = "none"
    deterministic: bool = False


_current = Speed()


def current() -> Speed:
    """The settings :func:`configure` applied last (the defaults before)."""
    return _current


def _checked(values: Mapping, base: Speed | None = None) -> Speed:
    fields = {f.name for f in dataclasses.fields(Speed)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"speed.{unknown[0]}: unknown setting; valid settings are "
                          f"{sorted(fields - {'deterministic'})}")
    for key, allowed in _CHOICES.items():
        if key in values and values[key] not in allowed:
            raise ConfigError(f"speed.{key}={values[key]!r}: valid values are {list(allowed)}")
    if "cpu_chunk" in values and int(values["cpu_chunk"]) < 1:
        raise ConfigError(f"speed.cpu_chunk={values['cpu_chunk']}: must be >= 1 (images per forward pass)")
    return Speed(**{**dataclasses.asdict(_current if base is None else base), **values})


def _apply(s: Speed) -> None:
    torch.backends.cuda.matmul.allow_tf32 = s.tf32 is True
    torch.backends.cudnn.allow_tf32 = s.tf32 is not False
    if s.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(s.deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = s.deterministic
    torch.backends.cudnn.benchmark = False


def configure(speed: Mapping | None = None, deterministic: bool = False) -> Speed:
    """Apply the ``speed`` config node and ``deterministic`` to this process (torch's flags and :func:`current`);
    settings ``speed`` leaves out take their defaults (``ddrun buffer`` / ``ddrun teacher`` pass only
    ``deterministic``).

    Raises:
        ConfigError: an unknown setting or value (names the key and the valid values).
    """
    global _current
    values = {k: v for k, v in dict(speed or {}).items()}
    values["deterministic"] = bool(deterministic)
    s = _checked(values, Speed())
    _apply(s)
    _current = s
    return s


@contextlib.contextmanager
def using(**changes) -> Iterator[Speed]:
    """Temporarily change some settings (tests, ``scripts/bench.py``); the previous ones come back after."""
    global _current
    before = _current
    _current = _checked(changes)
    _apply(_current)
    try:
        yield _current
    finally:
        _current = before
        _apply(before)


# ---------------------------------------------------------------------------------------------------------------
# helpers of the batched paths


def batch_independent(net: nn.Module) -> bool:
    """Whether each sample's output of ``net`` is independent of the rest of its batch: no BatchNorm layer in
    training mode (those normalize with the batch's statistics and update running buffers)."""
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in net.modules())


def chunk_size(x: torch.Tensor) -> int | None:
    """Images per forward pass for the batch ``x`` float ``[B, C, H, W]``: None (the whole batch) on a GPU, else
    ``cpu_chunk`` scaled by ``32 * 32 / (H * W)`` (at least 1)."""
    if x.device.type != "cpu":
        return None
    area = max(1, int(x.shape[-1]) * int(x.shape[-2]))
    return max(1, _current.cpu_chunk * 1024 // max(area, 1024))


def chunked(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, net: nn.Module) -> torch.Tensor:
    """``fn(x)`` computed as ``cat(fn(chunk) for chunk in x)`` (:func:`chunk_size`) when ``net`` is
    :func:`batch_independent`, whole otherwise (the same values up to float rounding)."""
    n = chunk_size(x)
    if n is None or n >= len(x) or not batch_independent(net):
        return fn(x)
    return torch.cat([fn(c) for c in x.split(n)])


def layout(net: nn.Module) -> nn.Module:
    """``net`` converted in place to the channels-last memory format when ``channels_last`` is set (a network
    without 4-D parameters is unchanged); returns it."""
    if _current.channels_last:
        net.to(memory_format=torch.channels_last)
    return net


def classes_batched(net: nn.Module, device: torch.device) -> bool:
    """Whether DC/DSA's per-class gradients run as one vmapped pass: ``batched_classes`` (``auto``: on CUDA),
    and only for :func:`batch_independent` networks."""
    want = _current.batched_classes
    want = torch.device(device).type == "cuda" if want == "auto" else bool(want)
    return want and batch_independent(net)


def precision(device: torch.device) -> str | None:
    """``"bf16 autocast"`` when :func:`autocast` lowers the precision of work on ``device``, else None."""
    return "bf16 autocast" if _current.autocast == "bf16" and torch.device(device).type in ("cuda", "cpu") else None


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The ``autocast`` context for work on ``device``: bfloat16 autocast on CUDA and on the CPU when
    ``autocast=bf16`` (convolutions and matmuls in bfloat16, reductions and losses in float32; torch's op lists),
    else nothing. The cast cache is off: the context spans whole trainings (the evaluator's, DC's inner loop), and
    a cached bfloat16 copy of a weight would stay the weight before the optimizer's steps (networks that never
    learn: 9.8 % on Fashion-MNIST with it on)."""
    if precision(device):
        if torch.device(device).type == "cpu":
            _warn_cpu_bf16()
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


@functools.cache
def _warn_cpu_bf16() -> None:
    log.warning("speed.autocast=bf16 on the CPU: the evaluation measured 1.5x slower than float32 even with "
                "AVX512-BF16 (README \"Speed settings\"); it is a GPU setting, speed.autocast=none is faster here")


def evaluate(evaluator: Callable, syn, real, seed: int, device: torch.device) -> dict:
    """``evaluator(syn, real, seed)`` under :func:`autocast`; its result's ``protocol_fields`` name the teachers
    of relabeled labels (:func:`ddrun.protocol.with_labels`) and gain ``precision`` when the precision was lowered,
    and its ``protocol`` line is described again from them (:func:`ddrun.protocol.describe`, as every evaluator's
    line is), so such accuracies say so."""
    with autocast(device):
        res = with_labels(evaluator(syn, real, seed), getattr(syn, "meta", {}))
    lowered = precision(device)
    if lowered is None:
        return res
    fields = {**res["protocol_fields"], "precision": lowered}
    return {**res, "protocol_fields": fields, "protocol": describe(fields)}

"""Shared fixtures: config composition and the real Fashion-MNIST files."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

sys.path.insert(0, str(Path(__file__).parent))

FMNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")

# Under pytest-xdist (scripts/test.sh runs one worker per core) the cores are split between the workers: each
# worker's torch and the `ddrun` processes its tests start (OMP_NUM_THREADS) get cores // workers threads, so that
# two workers do not each spin two OpenMP threads on the same two cores.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _threads = max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)

# device=auto (every test's default) runs on CUDA where it is available (scripts/gpu_check.sh).
CUDA = torch.cuda.is_available()
# "The same S" on a GPU: float sums in cuDNN's convolutions, cuBLAS and atomics-based backward kernels (DSA's
# grid_sample) are reordered from run to run, and Adam's normalized steps (and sign-like updates of S) turn those
# last-bit differences into lr-sized steps of S within a few iterations: on an H200, repeated and resumed runs of
# this suite ended 0.03-0.9 apart (S in normalized units). So every test whose claim is "the same S" (a repeat, a
# resume, a requeue) adds SAME_S to its overrides: `deterministic=true` on a GPU (deterministic kernels, cuBLAS
# workspace setting: tests/test_speed.py checks that it repeats S), nothing on the CPU, where runs repeat anyway.
# It then compares with assert_same_s: bitwise on the CPU, within GPU_TOL on CUDA.
SAME_S = ["deterministic=true"] if CUDA else []
GPU_TOL = dict(rtol=1e-3, atol=1e-3)


def assert_same_s(a: torch.Tensor, b: torch.Tensor, **gpu_tol) -> None:
    """Two tensors of runs that must agree: bitwise on the CPU, within ``GPU_TOL`` (or ``gpu_tol``) on CUDA."""
    if CUDA:
        torch.testing.assert_close(a, b, **(gpu_tol or GPU_TOL))
    else:
        assert torch.equal(a, b)


def make_cfg(overrides: list[str] | None = None, config_name: str = "distill"):
    """Compose the real ``ddrun.conf`` tree with ``overrides`` (as ``ddrun <cmd> overrides`` would)."""
    with initialize_config_module("ddrun.conf", version_base="1.3"):
        return compose(config_name, overrides=list(overrides or []))


def ddrun_process(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """``ddrun args`` in a new interpreter (``python -m ddrun.cli``, the ``ddrun`` script's entry point), its output
    captured as text; ``kwargs`` go to ``subprocess.run`` (``env``, ``cwd``, ``timeout``). For the tests of the
    process itself; the checks that stop a command before its work use :func:`ddrun_here`."""
    return subprocess.run([sys.executable, "-m", "ddrun.cli", *args], capture_output=True, text=True, **kwargs)


def ddrun_here(*args: str) -> subprocess.CompletedProcess:
    """``ddrun args`` run by ``ddrun.cli.main`` (what the ``ddrun`` script calls) inside this process, with its
    stdout, stderr and exit status returned as ``subprocess.run`` would.

    For the checks that stop a command before its work (bad values, missing or corrupt files, refused reruns, and
    the tiny runs some of them need first): a new interpreter would spend about 6 CPU seconds importing torch and
    torchvision for each. The tests of the process itself (the entry point, signals, concurrent processes,
    launchers, progress without a terminal) keep ``subprocess``. An exception other than ``SystemExit`` escaping
    ``main`` fails the test where a process would have printed a traceback; ``sys.argv`` and the root logger's
    handlers (Hydra configures its own per run) are restored after. What a run sets for its whole process (the
    seeds, ``speed``'s torch flags) stays set, as after any test that calls ``distill`` directly.
    """
    from ddrun.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, root = sys.argv[:], logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:
                code = exc.code
    finally:
        sys.argv = argv
        for h in set(root.handlers) - set(handlers):
            h.close()
        root.handlers[:], root.level = handlers, level
    if isinstance(code, str):  # sys.exit("message"): the interpreter prints it and exits 1
        err.write(code + "\n")
    status = 0 if code is None else code if isinstance(code, int) else 1
    return subprocess.CompletedProcess(["ddrun", *args], status, out.getvalue(), err.getvalue())


@pytest.fixture
def tiny_root(tmp_path) -> Path:
    """A ``paths.data`` root with a tiny MNIST (12 train / 4 test images per class, the real IDX format)."""
    from formats import write_mnist_like

    write_mnist_like(tmp_path / "data", "MNIST", n_train=12, n_test=4)
    return tmp_path / "data"


@pytest.fixture
def cfg_factory():
    return make_cfg


def _fmnist_source() -> Path | None:
    env = os.environ.get("DDRUN_DATA")
    if env and (Path(env) / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        return Path(env)
    if (FMNIST_SYSTEM / "train-images-idx3-ubyte.gz").is_file():
        return FMNIST_SYSTEM
    return None


@pytest.fixture(scope="session")
def fmnist_root(tmp_path_factory) -> Path:
    """A ``paths.data`` root from which the real Fashion-MNIST loads (decompressed once per session)."""
    src = _fmnist_source()
    if src is None:
        pytest.skip("real Fashion-MNIST not installed: `apt-get install dataset-fashion-mnist` "
                    f"(puts it in {FMNIST_SYSTEM}) or set DDRUN_DATA to a root holding FashionMNIST/raw/")
    if src != FMNIST_SYSTEM:
        return src
    return tmp_path_factory.mktemp("data")


@pytest.fixture(autouse=True)
def _wandb_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")

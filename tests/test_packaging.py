"""The config tree ships inside the package: a built wheel carries every YAML and composes without the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_config_tree_and_composes(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("ddrun-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n for n in names if n.startswith("ddrun/conf/") and n.endswith(".yaml")}
    in_repo = {"ddrun/conf/" + str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")}
    assert shipped == in_repo and "ddrun/conf/distill.yaml" in shipped
    assert "ddrun/conf/__init__.py" in names
    # install the wheel's files alone and compose from them, far from the checkout
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import ddrun.conf, sys; from hydra import compose, initialize_config_module\n"
            "assert ddrun.conf.__file__.startswith(sys.argv[1]), ddrun.conf.__file__\n"
            "with initialize_config_module('ddrun.conf', version_base='1.3'):\n"
            "    c = compose('distill', ['method=dsa', 'ipc=10'])\n"
            "print(c.schedule.outer_loop, c.preset.name)")
    # the wheel's files first; PYTHONPATH entries of the environment (dependencies installed there) after them,
    # but never the checkout
    deps = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    out = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": os.pathsep.join([str(site), *deps]), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["10", "dsa"]

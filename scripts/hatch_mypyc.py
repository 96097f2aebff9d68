"""Hatch build hook: compile the per-message hot path with mypyc into the wheel.

    HATCH_BUILD_HOOKS_ENABLE=1 pip wheel --no-deps --no-build-isolation -w build/dist .

(`make native` does this and installs the wheel into build/native; `make run`,
`make bench` and the first pass of `make test` put that directory first on PYTHONPATH.)
Off by default, so `pip install -e .` and a plain `pip wheel .` stay pure Python.

The modules are listed in pyproject.toml (`[tool.hatch.build.targets.wheel.hooks.custom]
compile`).  mypyc compiles them in a scratch copy of src/ under build/mypyc/, never in
the source tree: an extension file beside a ``.py`` is what Python's own loader prefers,
so one left in src/ would shadow later edits.  The wheel carries each ``.so`` beside its
``.py`` (and mypyc's shared runtime at the top level), so an installed build is exactly
the sources it was built from and cannot go stale.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SETUP = """\
from setuptools import setup
from mypyc.build import mypycify

setup(name="empath-native", ext_modules=mypycify({modules!r}, opt_level="3"))
"""


# setuptools' own scratch directories, outside the copy whose .so files are collected
SCRATCH = ("--build-temp", "../tmp", "--build-lib", "../lib")


class MypycHook(BuildHookInterface[Any]):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version == "editable":
            return
        modules = [str(m) for m in self.config.get("compile", [])]
        root = Path(self.root)
        work = root / "build" / "mypyc"
        shutil.rmtree(work, ignore_errors=True)
        src = work / "src"
        shutil.copytree(
            root / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.so", "_native")
        )
        (src / "setup.py").write_text(SETUP.format(modules=modules))
        done = subprocess.run(
            [
                sys.executable,
                "setup.py",
                "build_ext",
                "--inplace",
                "--build-temp",
                "../tmp",
                "--build-lib",
                "../lib",
            ],
            cwd=src,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"mypyc failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}")
        built = sorted(src.rglob("*.so"))
        if len(built) != len(modules) + 1:  # one per module + the shared runtime
            raise RuntimeError(f"mypyc built {[p.name for p in built]} for {modules}")
        for path in built:
            build_data["force_include"][str(path)] = path.relative_to(src).as_posix()
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

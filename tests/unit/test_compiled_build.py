"""The compiled build is a wheel: `make test` runs the suite with it first on PYTHONPATH
(EMPATH_EXPECT_COMPILED=1), then the unit tests on the source tree.  Each pass checks it
runs what it says it runs."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tomllib
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import orjson

import empath
import empath.spool.model
from empath.compiled import compiled_modules
from empath.logs import encode_line
from empath.testing.settings import breaker_settings

ROOT = Path(__file__).resolve().parents[2]
HOOK = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"][
    "wheel"
]["hooks"]["custom"]
LISTED = tuple(sorted(p.removesuffix(".py").replace("/", ".") for p in HOOK["compile"]))
EXPECT_COMPILED = os.environ.get("EMPATH_EXPECT_COMPILED") == "1"


def test_the_package_root_runs_nothing() -> None:
    text = (ROOT / "src" / "empath" / "__init__.py").read_text()
    assert len(text.splitlines()) <= 5
    assert "import" not in text


def test_the_hot_path_is_compiled_exactly_when_this_pass_expects_it() -> None:
    for name in LISTED:
        importlib.import_module(name)
    if EXPECT_COMPILED:
        assert LISTED == compiled_modules()
        build = ROOT / "build" / "native" / "empath"
        assert Path(empath.__file__).parent == build
        for name in LISTED:
            file = sys.modules[name].__file__
            assert file is not None and file.endswith(tuple(EXTENSION_SUFFIXES)), name
    else:
        assert () == compiled_modules()
        assert Path(empath.__file__).parent == ROOT / "src" / "empath"


def test_the_source_tree_never_holds_an_extension_file() -> None:
    """Python's loader prefers a .so beside a .py: one left in src/ would shadow edits."""
    suffixes = tuple(EXTENSION_SUFFIXES)
    assert [] == [p for p in (ROOT / "src").rglob("*") if p.name.endswith(suffixes)]


def test_the_spool_model_stays_interpreted() -> None:
    """orjson serialises the model's dataclasses by reading their slots (spool/codec.py);
    a mypyc-compiled class has none and crashes it, so model.py must never be compiled."""
    assert "empath.spool.model" not in LISTED
    assert empath.spool.model.__file__ is not None
    assert empath.spool.model.__file__.endswith(".py")


def test_log_lines_never_hand_a_dataclass_to_orjson() -> None:
    settings = breaker_settings()
    line = orjson.loads(encode_line({"settings": settings}))
    assert line == {"settings": str(settings)}


def test_a_daemon_process_loads_what_this_pass_expects() -> None:
    """The integration tests start `python -m empath` with this environment: after the
    daemon's own imports, every hot-path module it loaded is compiled (or none is)."""
    code = (
        "import sys, empath.app\n"
        "from empath.compiled import compiled_modules\n"
        "print(' '.join(compiled_modules()))\n"
        "print(' '.join(m for m in sys.modules if m.startswith('empath.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    ).stdout.split("\n")
    compiled, loaded = set(out[0].split()), set(out[1].split())
    hot = set(LISTED) & loaded
    assert len(hot) >= 10  # the daemon imports most of the hot path at start-up
    assert (hot if EXPECT_COMPILED else set()) == compiled

"""Empath: a durable, fast mail transfer agent.

Compiled modules.  ``make native`` (run by ``make run``, ``make test`` and ``make
bench``; see ``scripts/build_native.py``) compiles the per-message hot path with
mypyc into ``empath/_native/``.  Its ``manifest.json`` is the only list of what is
loaded from there: the modules it names as ``compiled`` (and their shared mypyc
runtime) are imported from their extension files by a finder put first on
``sys.meta_path``; every other module is the ``.py``.  The build is used only when the
manifest holds the SHA-256 of every ``.py`` under ``src/empath`` as it is now - mypyc
compiles against the types of the modules a compiled one imports, so an edit to any
of them (or a file added or removed) makes the whole build stale, all or nothing.
``EMPATH_PURE_PYTHON=1`` turns it off.  ``NATIVE`` says whether a build is in use and
``NATIVE_MODULES`` which modules it serves (the daemon logs both at startup).

Every process that imports anything of Empath runs this module first, `empathctl`
included, whose start-up an operator waits for: it imports only ``os``, ``sys`` and
``pathlib`` up front; the rest (hashing, JSON, the import machinery) only when a
build is there to be checked or loaded.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType

__version__ = "0.1.0"

_ROOT = Path(__file__).resolve().parent
NATIVE_DIRNAME = "_native"


def source_digests(root: Path = _ROOT) -> dict[str, str]:
    """SHA-256 of every ``.py`` under ``root`` (the build excluded), by relative path."""
    import hashlib

    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*.py"))
        if NATIVE_DIRNAME not in path.relative_to(root).parts
    }


def extension_path(native: Path, module: str, suffix: str) -> Path:
    """Where the build keeps a compiled module: ``empath.smtp.server`` ->
    ``_native/smtp/server<suffix>``; the top-level mypyc runtime lives in ``lib/``."""
    parts = module.split(".")
    if parts[0] != "empath":
        return native / "lib" / f"{module}{suffix}"
    return native.joinpath(*parts[1:-1], f"{parts[-1]}{suffix}")


class NativeBuild(NamedTuple):
    """A usable build: its directory and the extension file of each module it serves."""

    directory: Path
    compiled: tuple[str, ...]  # the Empath modules, as the manifest lists them
    files: Mapping[str, Path]  # every module the finder serves, runtime included


def native_build(
    root: Path = _ROOT, ext_suffix: str | None = None, environ: Mapping[str, str] | None = None
) -> NativeBuild | None:
    """The build under ``root`` if it may be used: present, made for this interpreter,
    and from exactly the sources under ``root`` as they are now."""
    env = os.environ if environ is None else environ
    if env.get("EMPATH_PURE_PYTHON", "") not in ("", "0"):
        return None
    native = root / NATIVE_DIRNAME
    try:
        text = (native / "manifest.json").read_text()
    except OSError:
        return None  # no build: nothing more to import or check
    import json
    import sysconfig

    suffix = ext_suffix or sysconfig.get_config_var("EXT_SUFFIX")
    try:
        manifest = json.loads(text)
        if manifest.get("ext_suffix") != suffix:
            return None
        compiled = tuple(str(m) for m in manifest["compiled"])
        runtime = str(manifest["runtime"])
        if not compiled or manifest["sources"] != source_digests(root):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    files = {m: extension_path(native, m, suffix) for m in (*compiled, runtime)}
    if not all(path.is_file() for path in files.values()):
        return None
    return NativeBuild(native, compiled, files)


class NativeFinder:
    """Finds exactly the modules of one build, as extension modules (a meta path finder)."""

    def __init__(self, build: NativeBuild) -> None:
        self._files = dict(build.files)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        file = self._files.get(fullname)
        if file is None:
            return None
        import importlib.machinery
        import importlib.util

        loader = importlib.machinery.ExtensionFileLoader(fullname, str(file))
        return importlib.util.spec_from_file_location(fullname, file, loader=loader)


NATIVE_BUILD = native_build()
NATIVE = NATIVE_BUILD is not None
NATIVE_MODULES: tuple[str, ...] = NATIVE_BUILD.compiled if NATIVE_BUILD is not None else ()

if NATIVE_BUILD is not None:
    sys.meta_path.insert(0, NativeFinder(NATIVE_BUILD))

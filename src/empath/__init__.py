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
included, whose start-up an operator waits for, so nothing is checked up front: when
a build directory exists, a finder goes first on ``sys.meta_path`` that checks the
build (hashing every source, ~35 ms) only when a module the build has an extension
file for is imported.  `empathctl` imports none (its modules are never compiled), so
it pays one ``stat`` per Empath module and imports nothing but ``os`` and ``sys``
here.  ``NATIVE``, ``NATIVE_BUILD`` and ``NATIVE_MODULES`` are computed (the build
checked) on first access.  Nor does it import typing (see TYPE_CHECKING below).
"""

from __future__ import annotations

import os
import sys
from collections import namedtuple

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from importlib.machinery import ModuleSpec
    from pathlib import Path
    from types import ModuleType
    from typing import Any, NamedTuple

    NATIVE: bool
    NATIVE_BUILD: NativeBuild | None
    NATIVE_MODULES: tuple[str, ...]

__version__ = "0.1.0"

_ROOT_DIR = os.path.dirname(os.path.realpath(__file__))
NATIVE_DIRNAME = "_native"


def _root() -> Path:
    from pathlib import Path

    return Path(_ROOT_DIR)


def source_digests(root: Path | None = None) -> dict[str, str]:
    """SHA-256 of every ``.py`` under ``root`` (the build excluded), by relative path."""
    import hashlib

    root = _root() if root is None else root

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


if TYPE_CHECKING:

    class NativeBuild(NamedTuple):
        """A usable build: its directory and the extension file of each module it serves."""

        directory: Path
        compiled: tuple[str, ...]  # the Empath modules, as the manifest lists them
        files: Mapping[str, Path]  # every module the finder serves, runtime included

else:
    NativeBuild = namedtuple("NativeBuild", "directory compiled files")


def _pure_python(environ: Mapping[str, str]) -> bool:
    return environ.get("EMPATH_PURE_PYTHON", "") not in ("", "0")


def native_build(
    root: Path | None = None,
    ext_suffix: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> NativeBuild | None:
    """The build under ``root`` if it may be used: present, made for this interpreter,
    and from exactly the sources under ``root`` as they are now."""
    if _pure_python(os.environ if environ is None else environ):
        return None
    root = _root() if root is None else root
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


class _Unchecked:
    """Marks the build as not checked yet."""


_UNCHECKED = _Unchecked()
_build: NativeBuild | _Unchecked | None = _UNCHECKED


def _checked_build() -> NativeBuild | None:
    """The build, checked once per process (then its finder serves its modules)."""
    global _build
    if isinstance(_build, _Unchecked):
        _build = native_build()
    return _build


class LazyNativeFinder:
    """First on ``sys.meta_path`` while a build directory exists: an Empath module the
    build has an extension file for gets the build checked (once); a valid build's
    :class:`NativeFinder` then serves every module it lists.  Other imports cost a
    ``stat`` until then (the mypyc runtime is imported only by compiled modules)."""

    def __init__(
        self, native_dir: str, ext_suffix: str, check: Callable[[], NativeBuild | None]
    ) -> None:
        self._dir = native_dir
        self._suffix = ext_suffix
        self._check = check
        self._finder: NativeFinder | None = None
        self._checked = False

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if not self._checked:
            parts = fullname.split(".")
            if parts[0] != "empath" or len(parts) < 2:
                return None
            file = os.path.join(self._dir, *parts[1:-1], parts[-1] + self._suffix)
            if not os.path.isfile(file):
                return None
            build = self._check()
            self._checked = True
            self._finder = NativeFinder(build) if build is not None else None
        return None if self._finder is None else self._finder.find_spec(fullname, path, target)


def __getattr__(name: str) -> Any:
    if name == "NATIVE_BUILD":
        return _checked_build()
    if name == "NATIVE":
        return _checked_build() is not None
    if name == "NATIVE_MODULES":
        build = _checked_build()
        return build.compiled if build is not None else ()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _install() -> None:
    native_dir = os.path.join(_ROOT_DIR, NATIVE_DIRNAME)
    if _pure_python(os.environ) or not os.path.isdir(native_dir):
        return
    import _imp

    sys.meta_path.insert(
        0, LazyNativeFinder(native_dir, _imp.extension_suffixes()[0], _checked_build)
    )


_install()

"""Empath: a durable, fast mail transfer agent.

Compiled modules.  ``make native`` (run by ``make run``, ``make test`` and ``make
bench``; see ``scripts/build_native.py``) compiles the per-message hot path -
the SMTP state machine, the session pump, record encoding, logging, scheduling
and policy - with mypyc into ``empath/_native/``, mirroring the package tree.
That build is used only when its ``manifest.json`` names the SHA-256 of every
current source it was made from (all or nothing: compiled modules call each
other directly), so an edited module is never shadowed by a stale build;
``EMPATH_PURE_PYTHON=1`` turns it off.  ``NATIVE`` says which is in use (the
daemon logs it at startup).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path

__version__ = "0.1.0"

_ROOT = Path(__file__).resolve().parent


def native_build(
    root: Path = _ROOT, ext_suffix: str | None = None, environ: Mapping[str, str] | None = None
) -> Path | None:
    """The ``_native`` directory if it may be used: present, built for this
    interpreter, and from exactly the sources under ``root``."""
    env = os.environ if environ is None else environ
    if env.get("EMPATH_PURE_PYTHON", "") not in ("", "0"):
        return None
    native = root / "_native"
    try:
        manifest = json.loads((native / "manifest.json").read_text())
        suffix = ext_suffix or sysconfig.get_config_var("EXT_SUFFIX")
        if manifest.get("ext_suffix") != suffix:
            return None
        sources = manifest["sources"]
        if not sources:
            return None
        for module, digest in sources.items():
            rel = Path(*module.split(".")[1:])  # "empath.smtp.server" -> smtp/server
            source = (root / rel.with_suffix(".py")).read_bytes()
            if hashlib.sha256(source).hexdigest() != digest:
                return None
            if not (native / rel.parent / f"{rel.name}{suffix}").is_file():
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return native


NATIVE_DIR = native_build()
NATIVE = NATIVE_DIR is not None


def use_native(package: str, path: list[str]) -> None:
    """Called by each subpackage's ``__init__``: look for its modules in the build first."""
    if NATIVE_DIR is not None:
        mirror = NATIVE_DIR.joinpath(*package.split(".")[1:])
        if mirror.is_dir():
            path.insert(0, str(mirror))


if NATIVE_DIR is not None:
    # Modules are looked up along __path__, the compiled ones first; their shared
    # mypyc runtime is a uniquely named top-level module, found through sys.path.
    __path__.insert(0, str(NATIVE_DIR))
    sys.path.append(str(NATIVE_DIR / "lib"))

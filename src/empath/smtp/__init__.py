"""SMTP protocol logic without I/O: parsing, the inbound state machine, replies, the client.

Compiled modules.  ``make native`` (run by ``make run``, ``make test`` and ``make
bench``) compiles six of these modules with mypyc into ``_native/`` (see
``scripts/build_native.py``).  They are used only when ``_native/manifest.json``
names the SHA-256 of every current source file, so an edited module is never
shadowed by a stale build; ``EMPATH_PURE_PYTHON=1`` turns them off.  ``NATIVE``
says which is in use (the daemon logs it at startup).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def native_build(
    pkg_dir: Path = _HERE, ext_suffix: str | None = None, environ: dict[str, str] | None = None
) -> Path | None:
    """The ``_native`` directory if it may be used: present, built for this interpreter,
    and from exactly the sources beside it."""
    env = os.environ if environ is None else environ
    if env.get("EMPATH_PURE_PYTHON", "") not in ("", "0"):
        return None
    native = pkg_dir / "_native"
    try:
        manifest = json.loads((native / "manifest.json").read_text())
        suffix = ext_suffix or sysconfig.get_config_var("EXT_SUFFIX")
        if manifest.get("ext_suffix") != suffix:
            return None
        sources = manifest["sources"]
        if not sources:
            return None
        for module, digest in sources.items():
            source = (pkg_dir / f"{module}.py").read_bytes()
            if hashlib.sha256(source).hexdigest() != digest:
                return None
            if not (native / f"{module}{suffix}").is_file():
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return native


NATIVE = False
_native = native_build()
if _native is not None:
    # Submodules are looked up along __path__: the compiled ones first.  Their shared
    # mypyc runtime is a uniquely named top-level module, found through sys.path.
    __path__.insert(0, str(_native))
    sys.path.append(str(_native / "lib"))
    NATIVE = True

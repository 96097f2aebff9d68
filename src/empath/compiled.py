"""Which of Empath's loaded modules are mypyc-compiled extension files.

An installed compiled wheel (`make native`) has a ``.so`` beside each hot-path ``.py``
and Python's loader prefers it; a source checkout or a plain wheel has none.  The
daemon's ``Empath ready`` line and ``empathctl status`` report what is actually loaded.
"""

from __future__ import annotations

import sys
from importlib.machinery import EXTENSION_SUFFIXES


def compiled_modules() -> tuple[str, ...]:
    """The loaded ``empath`` modules that came from an extension file, sorted."""
    suffixes = tuple(EXTENSION_SUFFIXES)
    return tuple(
        sorted(
            name
            for name, module in list(sys.modules.items())
            if name.startswith("empath.")
            and (getattr(module, "__file__", None) or "").endswith(suffixes)
        )
    )

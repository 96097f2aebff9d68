#!/usr/bin/env python3
"""Compile the sans-I/O SMTP modules with mypyc into src/empath/smtp/_native/.

    .venv/bin/python scripts/build_native.py      (run by `make native`)

Why: the SMTP state machine runs for every command of every session on the
event-loop thread, which is what bounds ingest on a small machine; compiled,
it costs roughly half.  Only `empath.smtp`'s six modules are compiled: they
are pure functions and classes over bytes (no I/O, no threads), fully typed
under mypy --strict and covered by the unit and hypothesis tests.

The build happens in a scratch copy of src/, so nothing compiled ever lands
next to a .py file.  The result directory holds the extension modules, the
shared mypyc runtime under lib/, and manifest.json with the SHA-256 of each
source: `empath/smtp/__init__.py` uses the build only while every source still
matches it, so an edited module is never shadowed by a stale build.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "src" / "empath" / "smtp"
OUT = PKG / "_native"
MODULES = ("parsing", "data", "server", "replies", "events", "relay")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    mypyc = Path(sys.executable).with_name("mypyc")
    if not mypyc.exists():
        print(f"build_native: {mypyc} not found (install the test extras)", file=sys.stderr)
        return 1
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    with tempfile.TemporaryDirectory(prefix="empath-native-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("_native", "__pycache__"))
        targets = [f"empath/smtp/{m}.py" for m in MODULES]
        done = subprocess.run(
            [str(mypyc), *targets], cwd=src, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
            return 1
        staged = Path(tmp) / "_native"
        (staged / "lib").mkdir(parents=True)
        for module in MODULES:
            shutil.copy2(src / "empath" / "smtp" / f"{module}{suffix}", staged)
        runtimes = list(src.glob(f"*__mypyc{suffix}"))
        if len(runtimes) != 1:
            print(f"build_native: expected one mypyc runtime, found {runtimes}", file=sys.stderr)
            return 1
        shutil.copy2(runtimes[0], staged / "lib")
        manifest = {
            "ext_suffix": suffix,
            "sources": {m: digest(src / "empath" / "smtp" / f"{m}.py") for m in MODULES},
        }
        (staged / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(OUT, ignore_errors=True)
        shutil.copytree(staged, OUT)
    print(f"build_native: compiled {', '.join(MODULES)} into {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Compile Empath's per-message hot path with mypyc into src/empath/_native/.

    .venv/bin/python scripts/build_native.py      (run by `make native`)

Why: ingest on a small machine is bound by the event-loop thread, and every
accepted message runs these modules there: the SMTP state machine, the session
pump, record encoding, log lines, ids, the scheduler and the policy state.
Compiled, the event loop spends about 10 % less CPU per message (user time -18 %;
the README has the numbers).  All are typed under mypy --strict; the whole test
suite runs against the compiled build in `make test`.

Deliberately left out: spool/model.py (orjson serialises those dataclasses by
reading their slots, which mypyc-compiled classes do not have - it crashes), and
the modules full of threads, files and async generators (spool/fs.py, writer.py,
body.py, queue/runner.py, transport/listener.py), where mypyc's runtime type
checks would buy little and risk much.

The build happens in a scratch copy of src/, so nothing compiled lands next to
a .py file.  _native/ mirrors the package tree (extension modules), holds the
shared mypyc runtime under lib/ and manifest.json with the SHA-256 of every
source compiled: `empath/__init__.py` uses the build only while all of them
still match, so an edited module is never shadowed by a stale build.
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
PKG = ROOT / "src" / "empath"
OUT = PKG / "_native"
MODULES = (
    "empath.ids",
    "empath.observability.logs",
    "empath.policy.breaker",
    "empath.policy.ratelimit",
    "empath.policy.state",
    "empath.queue.index",
    "empath.queue.scheduler",
    "empath.smtp.data",
    "empath.smtp.events",
    "empath.smtp.parsing",
    "empath.smtp.relay",
    "empath.smtp.replies",
    "empath.smtp.server",
    "empath.spool.codec",
    "empath.transport.session",
)


def rel_path(module: str) -> Path:
    """empath.smtp.server -> smtp/server (relative to the empath package)."""
    return Path(*module.split(".")[1:])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    mypyc = Path(sys.executable).with_name("mypyc")
    if not mypyc.exists():
        print(f"build_native: {mypyc} not found (install the test extras)", file=sys.stderr)
        return 1
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    wanted = {
        "ext_suffix": suffix,
        "sources": {m: digest(PKG / rel_path(m).with_suffix(".py")) for m in MODULES},
    }
    try:
        if json.loads((OUT / "manifest.json").read_text()) == wanted:
            (OUT / "manifest.json").touch()  # make's timestamp: nothing to rebuild
            print("build_native: up to date")
            return 0
    except (OSError, ValueError):
        pass
    with tempfile.TemporaryDirectory(prefix="empath-native-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("_native", "__pycache__"))
        targets = [str(Path("empath") / rel_path(m).with_suffix(".py")) for m in MODULES]
        done = subprocess.run(
            [str(mypyc), *targets], cwd=src, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
            return 1
        staged = Path(tmp) / "_native"
        (staged / "lib").mkdir(parents=True)
        for module in MODULES:
            rel = rel_path(module)
            (staged / rel.parent).mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / "empath" / rel.parent / f"{rel.name}{suffix}", staged / rel.parent)
        runtimes = list(src.glob(f"*__mypyc{suffix}"))
        if len(runtimes) != 1:
            print(f"build_native: expected one mypyc runtime, found {runtimes}", file=sys.stderr)
            return 1
        shutil.copy2(runtimes[0], staged / "lib")
        manifest = {
            "ext_suffix": suffix,
            "sources": {
                m: digest(src / "empath" / rel_path(m).with_suffix(".py")) for m in MODULES
            },
        }
        (staged / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(OUT, ignore_errors=True)
        shutil.copytree(staged, OUT)
    print(f"build_native: compiled {len(MODULES)} modules into {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

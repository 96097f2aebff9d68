#!/usr/bin/env python3
"""Compile Empath's per-message hot path with mypyc into src/empath/_native/.

    .venv/bin/python scripts/build_native.py      (run by `make native`)

Why: ingest on a small machine is bound by the event-loop thread, and every
accepted message runs these modules there: the SMTP state machine, the session
pump, record encoding, log lines, ids, the scheduler and the policy state.
Compiled, the event-loop thread spends 9-14 % less CPU per message (the README
has the numbers and how they were measured).  All are typed under mypy --strict; the whole test
suite runs against the compiled build in `make test`.

Deliberately left out: spool/model.py (orjson serialises those dataclasses by
reading their slots, which mypyc-compiled classes do not have - it crashes), and
the modules full of threads, files and async generators (spool/fs.py, writer.py,
body.py, queue/runner.py, transport/listener.py), where mypyc's runtime type
checks would buy little and risk much.

The build happens in a scratch copy of src/, so nothing compiled lands next to
a .py file.  _native/ mirrors the package tree (extension modules), holds the
shared mypyc runtime under lib/ and manifest.json: the modules compiled (MODULES
below is the one hand-kept list; `empath/__init__.py` loads what the manifest
names, nothing else) and the SHA-256 of every source under src/empath.  mypyc
compiles against the types of everything a compiled module imports, so the build
is used - and `make native` says "up to date" - only while all of them still match.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "src" / "empath"
sys.path.insert(0, str(ROOT / "src"))
from empath import (  # noqa: E402 (the package of this checkout, wherever it is installed)
    NATIVE_DIRNAME,
    extension_path,
    native_build,
    source_digests,
)

OUT = PKG / NATIVE_DIRNAME
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


def main() -> int:
    mypyc = Path(sys.executable).with_name("mypyc")
    if not mypyc.exists():
        print(f"build_native: {mypyc} not found (install the test extras)", file=sys.stderr)
        return 1
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    current = native_build(PKG, suffix, environ={})
    if current is not None and current.compiled == MODULES:
        (OUT / "manifest.json").touch()  # make's timestamp: nothing to rebuild
        print("build_native: up to date")
        return 0
    with tempfile.TemporaryDirectory(prefix="empath-native-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("_native", "__pycache__"))
        sources = source_digests(src / "empath")  # what is compiled, even if edited meanwhile
        targets = [module_source(m) for m in MODULES]
        done = subprocess.run(
            [str(mypyc), *targets], cwd=src, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
            return 1
        runtimes = list(src.glob(f"*__mypyc{suffix}"))
        if len(runtimes) != 1:
            print(f"build_native: expected one mypyc runtime, found {runtimes}", file=sys.stderr)
            return 1
        runtime = runtimes[0].name.removesuffix(suffix)
        staged = Path(tmp) / NATIVE_DIRNAME
        built = {m: extension_path(src / "empath", m, suffix) for m in MODULES}
        built[runtime] = runtimes[0]
        for module, path in built.items():
            target = extension_path(staged, module, suffix)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        manifest = {
            "ext_suffix": suffix,
            "compiled": list(MODULES),
            "runtime": runtime,
            "sources": sources,
        }
        (staged / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(OUT, ignore_errors=True)
        shutil.copytree(staged, OUT)
    print(f"build_native: compiled {len(MODULES)} modules into {OUT.relative_to(ROOT)}")
    return 0


def module_source(module: str) -> str:
    """empath.smtp.server -> empath/smtp/server.py (relative to src/)."""
    return "/".join(module.split(".")) + ".py"


if __name__ == "__main__":
    sys.exit(main())

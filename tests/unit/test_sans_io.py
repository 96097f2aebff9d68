"""House style: the protocol and decision modules are sans-I/O.

``smtp/`` (parsers, both state machines), ``policy/`` (breakers, rate limits, retry,
the policy state), the scheduler and its due index, the pure delivery transition and
a cluster node's local view import nothing that does I/O or waits (no asyncio, sockets, TLS,
threads, subprocesses, wall clocks) and, from Empath, only each other and the leaf
modules every layer may use (the clock protocol, the error tree, the spool's data
model, ids).  Time comes from an injected :class:`~empath.clock.Clock`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import empath

SRC = Path(empath.__file__).parent
PURE = sorted(
    [
        *(SRC / "smtp").glob("*.py"),
        *(SRC / "policy").glob("*.py"),
        SRC / "queue" / "index.py",
        SRC / "queue" / "scheduler.py",
        *(SRC / "delivery" / name for name in ("transition.py", "classify.py", "bounce.py")),
        SRC / "modules" / "milter" / "codec.py",  # the milter protocol (DESIGN §14)
        # a cluster node's local view of the shared state (DESIGN §11); asker.py does I/O
        *(SRC / "cluster" / name for name in ("view.py", "breakers.py", "asks.py")),
    ]
)
FORBIDDEN = {
    "asyncio", "selectors", "signal", "socket", "ssl", "subprocess", "threading", "time",
    "uvloop", "dns", "orjson",
}  # fmt: skip
LEAVES = {"empath", "empath.clock", "empath.errors", "empath.spool.model", "empath.ids"}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(("empath", *parts))


PURE_MODULES = {module_name(p) for p in PURE} | {"empath.smtp", "empath.policy"}


def imports_of(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_the_guard_covers_smtp_policy_and_the_scheduler() -> None:
    names = {module_name(p) for p in PURE}
    assert {"empath.smtp.server", "empath.smtp.client", "empath.policy.breaker"} <= names
    assert {"empath.policy.state", "empath.queue.scheduler", "empath.queue.index"} <= names
    assert "empath.modules.milter.codec" in names
    assert {"empath.cluster.view", "empath.cluster.breakers"} <= names


@pytest.mark.parametrize("path", PURE, ids=lambda p: str(p.relative_to(SRC)))
def test_pure_modules_import_no_io(path: Path) -> None:
    imported = imports_of(path)
    assert set() == {name for name in imported if name.split(".")[0] in FORBIDDEN}
    foreign = {
        name
        for name in imported
        if name.split(".")[0] == "empath" and name not in PURE_MODULES | LEAVES
    }
    assert set() == foreign, f"{path.name} reaches an I/O layer"


def test_the_guard_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import asyncio.tasks\nfrom empath.spool.fs import FileSpool\n")
    assert {"asyncio.tasks", "empath.spool.fs"} == imports_of(bad)

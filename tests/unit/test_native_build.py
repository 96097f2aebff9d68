"""The compiled hot-path modules are used only when they were built from the current sources."""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from pathlib import Path

import orjson

import empath
import empath.smtp.server
import empath.spool.model
import empath.transport.session
from empath import native_build
from empath.observability.logs import encode_line
from empath.policy.breaker import BreakerSettings

SUFFIX = ".cpython-311-x86_64-linux-gnu.so"


def _tree(tmp_path: Path, *, modules: tuple[str, ...] = ("ids", "smtp.server")) -> Path:
    root = tmp_path / "empath"
    native = root / "_native"
    sources = {}
    for module in modules:
        rel = Path(*module.split("."))
        (root / rel.parent).mkdir(parents=True, exist_ok=True)
        (native / rel.parent).mkdir(parents=True, exist_ok=True)
        text = f"# {module}\n".encode()
        (root / rel.with_suffix(".py")).write_bytes(text)
        (native / rel.parent / f"{rel.name}{SUFFIX}").write_bytes(b"\x7fELF")
        sources[f"empath.{module}"] = hashlib.sha256(text).hexdigest()
    (native / "manifest.json").write_text(json.dumps({"ext_suffix": SUFFIX, "sources": sources}))
    return root


def test_a_build_from_the_current_sources_is_used(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    assert native_build(root, SUFFIX, {}) == root / "_native"


def test_one_edited_source_disables_the_whole_build(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (root / "smtp" / "server.py").write_text("# server, edited\n")
    assert native_build(root, SUFFIX, {}) is None


def test_another_interpreter_or_a_missing_module_disables_the_build(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    assert native_build(root, ".cpython-312-x86_64-linux-gnu.so", {}) is None
    (root / "_native" / f"ids{SUFFIX}").unlink()
    assert native_build(root, SUFFIX, {}) is None


def test_no_build_or_a_broken_manifest_means_pure_python(tmp_path: Path) -> None:
    assert native_build(tmp_path, SUFFIX, {}) is None
    root = _tree(tmp_path)
    (root / "_native" / "manifest.json").write_text("{not json")
    assert native_build(root, SUFFIX, {}) is None
    (root / "_native" / "manifest.json").write_text(json.dumps({"ext_suffix": SUFFIX}))
    assert native_build(root, SUFFIX, {}) is None


def test_the_environment_can_turn_it_off(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    assert native_build(root, SUFFIX, {"EMPATH_PURE_PYTHON": "1"}) is None
    assert native_build(root, SUFFIX, {"EMPATH_PURE_PYTHON": "0"}) == root / "_native"


def test_this_checkout_runs_the_build_it_has() -> None:
    """`make test` builds the modules first: with CI=true they must be the ones in use."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    built = native_build() is not None
    if os.environ.get("CI") == "true" and not os.environ.get("EMPATH_PURE_PYTHON"):
        assert built, "make native did not produce a usable build"
    assert empath.NATIVE is built
    for module in (empath.smtp.server, empath.transport.session):
        assert module.__file__ is not None
        assert module.__file__.endswith(suffix if built else ".py")


def test_the_spool_model_stays_interpreted() -> None:
    """orjson serialises the model's dataclasses by reading their slots (spool/codec.py);
    a mypyc-compiled class has none and crashes it, so model.py must never be compiled."""
    assert empath.spool.model.__file__ is not None
    assert empath.spool.model.__file__.endswith(".py")


def test_log_lines_never_hand_a_dataclass_to_orjson() -> None:
    settings = BreakerSettings()
    line = orjson.loads(encode_line({"settings": settings}))
    assert line == {"settings": str(settings)}

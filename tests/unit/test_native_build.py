"""The compiled SMTP modules are used only when they were built from the current sources."""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from pathlib import Path

import empath.smtp
import empath.smtp.server
from empath.smtp import native_build

SUFFIX = ".cpython-311-x86_64-linux-gnu.so"


def _package(tmp_path: Path, *, modules: tuple[str, ...] = ("parsing", "server")) -> Path:
    pkg = tmp_path / "smtp"
    native = pkg / "_native"
    native.mkdir(parents=True)
    sources = {}
    for module in modules:
        text = f"# {module}\n".encode()
        (pkg / f"{module}.py").write_bytes(text)
        (native / f"{module}{SUFFIX}").write_bytes(b"\x7fELF")
        sources[module] = hashlib.sha256(text).hexdigest()
    (native / "manifest.json").write_text(json.dumps({"ext_suffix": SUFFIX, "sources": sources}))
    return pkg


def test_a_build_from_the_current_sources_is_used(tmp_path: Path) -> None:
    pkg = _package(tmp_path)
    assert native_build(pkg, SUFFIX, {}) == pkg / "_native"


def test_an_edited_source_disables_the_build(tmp_path: Path) -> None:
    pkg = _package(tmp_path)
    (pkg / "server.py").write_text("# server, edited\n")
    assert native_build(pkg, SUFFIX, {}) is None


def test_another_interpreter_or_a_missing_module_disables_the_build(tmp_path: Path) -> None:
    pkg = _package(tmp_path)
    assert native_build(pkg, ".cpython-312-x86_64-linux-gnu.so", {}) is None
    (pkg / "_native" / f"parsing{SUFFIX}").unlink()
    assert native_build(pkg, SUFFIX, {}) is None


def test_no_build_or_a_broken_manifest_means_pure_python(tmp_path: Path) -> None:
    assert native_build(tmp_path, SUFFIX, {}) is None
    pkg = _package(tmp_path)
    (pkg / "_native" / "manifest.json").write_text("{not json")
    assert native_build(pkg, SUFFIX, {}) is None
    (pkg / "_native" / "manifest.json").write_text(json.dumps({"ext_suffix": SUFFIX}))
    assert native_build(pkg, SUFFIX, {}) is None


def test_the_environment_can_turn_it_off(tmp_path: Path) -> None:
    pkg = _package(tmp_path)
    assert native_build(pkg, SUFFIX, {"EMPATH_PURE_PYTHON": "1"}) is None
    assert native_build(pkg, SUFFIX, {"EMPATH_PURE_PYTHON": "0"}) == pkg / "_native"


def test_this_checkout_runs_the_build_it_has() -> None:
    """`make test` builds the modules first: with CI=true they must be the ones in use."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    built = native_build() is not None
    if os.environ.get("CI") == "true" and not os.environ.get("EMPATH_PURE_PYTHON"):
        assert built, "make native did not produce a usable build"
    assert empath.smtp.NATIVE is built
    assert empath.smtp.server.__file__ is not None
    assert empath.smtp.server.__file__.endswith(suffix if built else ".py")

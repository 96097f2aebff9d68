"""The compiled build is used only when built from the current sources - all of them -
and what it serves is exactly what its manifest lists."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import orjson

import empath
import empath.spool.model
from empath import LazyNativeFinder, NativeFinder, native_build, source_digests
from empath.observability.logs import encode_line
from empath.testing.settings import breaker_settings

SUFFIX = ".cpython-311-x86_64-linux-gnu.so"
RUNTIME = "abc123__mypyc"


def _tree(tmp_path: Path, *, compiled: tuple[str, ...] = ("ids", "smtp.server")) -> Path:
    """A package with compiled modules and one that is not (spool/model.py)."""
    root = tmp_path / "empath"
    native = root / "_native"
    for module in (*compiled, "spool.model"):
        rel = Path(*module.split("."))
        (root / rel.parent).mkdir(parents=True, exist_ok=True)
        (root / rel.with_suffix(".py")).write_text(f"# {module}\n")
    for module in compiled:
        rel = Path(*module.split("."))
        (native / rel.parent).mkdir(parents=True, exist_ok=True)
        (native / rel.parent / f"{rel.name}{SUFFIX}").write_bytes(b"\x7fELF")
    (native / "lib").mkdir()
    (native / "lib" / f"{RUNTIME}{SUFFIX}").write_bytes(b"\x7fELF")
    manifest = {
        "ext_suffix": SUFFIX,
        "compiled": [f"empath.{m}" for m in compiled],
        "runtime": RUNTIME,
        "sources": source_digests(root),
    }
    (native / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_a_build_from_the_current_sources_serves_what_its_manifest_lists(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    build = native_build(root, SUFFIX, {})
    assert build is not None
    assert root / "_native" == build.directory
    assert ("empath.ids", "empath.smtp.server") == build.compiled
    assert {
        "empath.ids": root / "_native" / f"ids{SUFFIX}",
        "empath.smtp.server": root / "_native" / "smtp" / f"server{SUFFIX}",
        RUNTIME: root / "_native" / "lib" / f"{RUNTIME}{SUFFIX}",
    } == build.files


def test_the_finder_serves_the_manifests_modules_and_nothing_else(tmp_path: Path) -> None:
    build = native_build(_tree(tmp_path), SUFFIX, {})
    assert build is not None
    finder = NativeFinder(build)
    spec = finder.find_spec("empath.smtp.server", None)
    assert spec is not None
    assert str(build.files["empath.smtp.server"]) == spec.origin
    assert finder.find_spec(RUNTIME, None) is not None
    assert finder.find_spec("empath.spool.model", None) is None
    assert finder.find_spec("empath.smtp", None) is None


def test_an_edit_to_a_module_that_is_not_compiled_disables_the_build(tmp_path: Path) -> None:
    """mypyc compiled the others against spool/model.py's types: editing it makes the
    build stale (the old manifest hashed only the compiled modules)."""
    root = _tree(tmp_path)
    (root / "spool" / "model.py").write_text("# model, edited\n")
    assert native_build(root, SUFFIX, {}) is None


def test_a_source_added_or_removed_disables_the_build(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (root / "new.py").write_text("# new\n")
    assert native_build(root, SUFFIX, {}) is None
    (root / "new.py").unlink()
    assert native_build(root, SUFFIX, {}) is not None
    (root / "spool" / "model.py").unlink()
    assert native_build(root, SUFFIX, {}) is None


def test_one_edited_compiled_source_disables_the_whole_build(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (root / "smtp" / "server.py").write_text("# server, edited\n")
    assert native_build(root, SUFFIX, {}) is None


def test_another_interpreter_or_a_missing_extension_disables_the_build(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    assert native_build(root, ".cpython-312-x86_64-linux-gnu.so", {}) is None
    (root / "_native" / "lib" / f"{RUNTIME}{SUFFIX}").unlink()
    assert native_build(root, SUFFIX, {}) is None
    root = _tree(tmp_path / "again")
    (root / "_native" / f"ids{SUFFIX}").unlink()
    assert native_build(root, SUFFIX, {}) is None


def test_no_build_or_a_broken_manifest_means_pure_python(tmp_path: Path) -> None:
    assert native_build(tmp_path, SUFFIX, {}) is None
    root = _tree(tmp_path)
    manifest = root / "_native" / "manifest.json"
    good = json.loads(manifest.read_text())
    manifest.write_text("{not json")
    assert native_build(root, SUFFIX, {}) is None
    for key in ("compiled", "runtime", "sources"):
        manifest.write_text(json.dumps({k: v for k, v in good.items() if k != key}))
        assert native_build(root, SUFFIX, {}) is None
    manifest.write_text(json.dumps({**good, "compiled": []}))
    assert native_build(root, SUFFIX, {}) is None


def test_the_environment_can_turn_it_off(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    assert native_build(root, SUFFIX, {"EMPATH_PURE_PYTHON": "1"}) is None
    assert native_build(root, SUFFIX, {"EMPATH_PURE_PYTHON": "0"}) is not None


def test_every_compiled_module_is_the_one_loaded() -> None:
    """`make test` builds first: with CI=true the build must be in use, and then each
    module the manifest lists is its extension file; every other Empath module loaded
    is its .py."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    build = native_build()
    if os.environ.get("CI") == "true" and not os.environ.get("EMPATH_PURE_PYTHON"):
        assert build is not None, "make native did not produce a usable build"
    assert empath.NATIVE is (build is not None)
    compiled = build.compiled if build is not None else ()
    assert compiled == empath.NATIVE_MODULES
    for name in compiled:
        module = importlib.import_module(name)
        assert build is not None
        # Imported through the finder, __file__ is the module's extension file; imported
        # by a compiled group-mate, mypyc names it under the shared runtime's directory.
        assert module.__file__ is not None
        assert module.__file__.endswith(suffix), name
        assert module.__file__.startswith(str(build.directory)), name
    for name, module in list(sys.modules.items()):
        if name.startswith("empath.") and name not in compiled and module.__file__:
            assert module.__file__.endswith(".py"), name
            assert not module.__file__.endswith(suffix), name


def test_the_spool_model_stays_interpreted() -> None:
    """orjson serialises the model's dataclasses by reading their slots (spool/codec.py);
    a mypyc-compiled class has none and crashes it, so model.py must never be compiled."""
    assert "empath.spool.model" not in empath.NATIVE_MODULES
    assert empath.spool.model.__file__ is not None
    assert empath.spool.model.__file__.endswith(".py")


def test_log_lines_never_hand_a_dataclass_to_orjson() -> None:
    settings = breaker_settings()
    line = orjson.loads(encode_line({"settings": settings}))
    assert line == {"settings": str(settings)}


def test_the_build_is_checked_only_when_a_module_it_compiled_is_imported(
    tmp_path: Path,
) -> None:
    """`empathctl` start-up: importing modules the build has no extension file for
    (the CLI's) never hashes the sources; the first compiled one checks the build once,
    then its modules are served from it."""
    root = _tree(tmp_path)
    checks: list[int] = []

    def check() -> empath.NativeBuild | None:
        checks.append(1)
        return native_build(root, SUFFIX, {})

    finder = LazyNativeFinder(str(root / "_native"), SUFFIX, check)
    for name in ("empath.cli.empathctl", "empath.control.client", "empath", "json"):
        assert finder.find_spec(name, None) is None
    assert [] == checks
    spec = finder.find_spec("empath.smtp.server", None)
    assert spec is not None and spec.origin == str(root / "_native" / "smtp" / f"server{SUFFIX}")
    runtime = finder.find_spec(RUNTIME, None)
    assert runtime is not None and runtime.origin is not None
    assert finder.find_spec("empath.ids", None) is not None
    assert finder.find_spec("empath.spool.model", None) is None
    assert [1] == checks


def test_a_stale_build_found_lazily_serves_nothing(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (root / "spool" / "model.py").write_text("# edited\n")
    finder = LazyNativeFinder(str(root / "_native"), SUFFIX, lambda: native_build(root, SUFFIX, {}))
    assert finder.find_spec("empath.ids", None) is None
    assert finder.find_spec(RUNTIME, None) is None


def test_empathctl_start_up_does_not_check_the_build() -> None:
    """Whether or not a build is there: the CLI path leaves it unchecked (no hashing)."""
    code = (
        "import sys, empath, empath.cli.empathctl, empath.control.client\n"
        "print(empath._build is empath._UNCHECKED, 'hashlib' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert ["True", "False"] == out

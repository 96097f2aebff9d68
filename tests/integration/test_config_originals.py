"""The five configuration files the original (Rust) Empath ships load here (issue 8.7).

The files are copied unchanged into ``tests/data/original-configs/`` (their README says
where from).  ``empath --check-config`` accepts four as they are; ``production.ron``
lists three ``SharedLibrary`` modules, which are refused with one exact message, and
loads once they are removed.  The keys added for them (``modules``,
``metrics.endpoint``, ``audit.redact_message_content``) are checked like every other
key: a typo still fails.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from empath.config.load import load_config, loads_config
from empath.errors import ConfigError
from tests.daemon import Daemon, parked_overrides, submit

ORIGINALS = Path(__file__).resolve().parent.parent / "data" / "original-configs"
LOADABLE = (
    "docker--empath.config.ron",
    "empath.config.ron",
    "examples--config--development.ron",
    "examples--config--minimal.ron",
)
PRODUCTION = ORIGINALS / "examples--config--production.ron"


def check_config(path: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "empath"
    assert script.exists(), f"{script} is missing: the package is not installed"
    return subprocess.run(
        [str(script), "--check-config", str(path)],
        capture_output=True, text=True, timeout=30, check=False, cwd=cwd,
    )  # fmt: skip


def without_modules(text: str) -> str:
    """The file with its ``modules: [ ... ],`` entry cut out."""
    cut, count = re.subn(r"\n    modules: \[\n.*?\n    \],\n", "\n", text, flags=re.DOTALL)
    assert 1 == count
    return cut


@pytest.mark.parametrize("name", LOADABLE)
def test_the_original_configs_load_with_check_config(tmp_path: Path, name: str) -> None:
    out = check_config(ORIGINALS / name, tmp_path)
    assert 0 == out.returncode, out.stderr
    assert out.stdout.startswith("// Effective Empath configuration")


def test_the_originals_keys_mean_what_they_say() -> None:
    docker = load_config(ORIGINALS / "docker--empath.config.ron")
    assert "http://otel-collector:4318" == docker.metrics.endpoint
    assert 15.0 == docker.metrics.push_interval_secs
    assert docker.audit.redact_message_content
    minimal = load_config(ORIGINALS / "examples--config--minimal.ron")
    assert () == minimal.modules
    assert minimal.metrics.endpoint is None


def test_production_loads_once_its_native_modules_are_removed(tmp_path: Path) -> None:
    edited = tmp_path / "production.ron"
    edited.write_text(without_modules(PRODUCTION.read_text()))
    out = check_config(edited, tmp_path)
    assert 0 == out.returncode, out.stderr
    assert "modules: []" in out.stdout


def test_production_with_its_modules_is_refused_naming_python_and_milter(tmp_path: Path) -> None:
    out = check_config(PRODUCTION, tmp_path)
    assert 1 == out.returncode
    assert "" == out.stdout
    assert (
        f"empath: config error: {PRODUCTION}:49:19: modules[0].type: SharedLibrary module "
        "'/usr/lib/empath/modules/libspamfilter.so': native modules of the Rust "
        "implementation cannot be loaded by this Empath; write it as a Python module "
        '(type: "Python", name: "package.module:Factory") or run it as a milter '
        '(type: "Milter", address: "inet:HOST:PORT"), or remove this entry from modules\n'
    ) == out.stderr


TYPOS = {
    "modules": ("examples--config--minimal.ron", "    modules: [],", "    module: [],"),
    "endpoint": ("empath.config.ron", "        endpoint: ", "        endpont: "),
    "push_interval": (
        "empath.config.ron",
        "        enabled: true,\n\n        // OTLP",
        "        push_intervall_secs: 10,\n\n        // OTLP",
    ),
    "redact": ("empath.config.ron", "redact_message_content: true", "redact_message_contents: 1"),
    "module_field": (
        "examples--config--production.ron",
        '            arguments: ["--aggressive"],',
        '            argument: ["--aggressive"],',
    ),
    "endpoint_scheme": ("empath.config.ron", 'endpoint: "http://', 'endpoint: "'),
}


@pytest.mark.parametrize("case", sorted(TYPOS))
def test_a_typo_in_an_originals_key_still_fails(case: str) -> None:
    name, good, bad = TYPOS[case]
    text = (ORIGINALS / name).read_text()
    assert 1 == text.count(good)
    with pytest.raises(ConfigError) as caught:
        loads_config(text.replace(good, bad), file=name)
    assert name in str(caught.value)


def test_audit_lines_keep_the_message_content_out(tmp_path: Path) -> None:
    """``audit.redact_message_content: true`` (the originals' value): neither the subject
    nor the body of a received message appears in any log line."""
    overrides = parked_overrides("parked.test")
    overrides["audit"] = {"enabled": True, "redact_message_content": True}
    with Daemon(tmp_path / "empath", overrides=overrides) as daemon:
        body = "Subject: secret-subject-7f3a\n\nsecret-body-c41e\n"
        msg_id = submit(daemon.smtp_port, "a@example.org", ["b@parked.test"], body)
        daemon.wait_log("Message received", message_id=msg_id)
        text = daemon.log_path.read_text()
    assert msg_id in text
    assert "secret-subject-7f3a" not in text
    assert "secret-body-c41e" not in text

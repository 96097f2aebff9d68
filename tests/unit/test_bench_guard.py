"""The CPU-per-message guard (issue 20 #5): bench/ingest and bench/relay print each run's
figure next to the one docs/bench.md records, which they read from its marked table."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bench_common() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_bench_records_a_cpu_figure_for_ingest_and_for_relay() -> None:
    recorded = bench_common().recorded_cpu()
    assert {"ingest", "relay"} <= set(recorded)
    for name in ("ingest", "relay"):
        us, when = recorded[name]
        assert 50 < us < 10_000, (name, us)
        assert when.startswith("20"), (name, when)


def test_a_run_is_printed_with_its_change_against_the_recorded_figure(tmp_path: Path) -> None:
    doc = tmp_path / "bench.md"
    doc.write_text(
        "prose | 1 | not | a row\n<!-- cpu-per-message:begin -->\n"
        "| benchmark | µs/msg | recorded | build | how |\n|---|---:|---|---|---|\n"
        "| ingest | 500 | 2026-12-07 | compiled | test |\n"
        "| relay | 1,200 | 2026-12-06 | pure Python | test |\n"
        "<!-- cpu-per-message:end -->\n"
    )
    common = bench_common()
    assert "CPU 450 µs/msg (recorded 500 µs/msg on 2026-12-07, compiled: -10.0 %)" == (
        common.cpu_vs_recorded("ingest", 450.0, doc)
    )
    assert "(recorded 1200 µs/msg on 2026-12-06, pure Python: +5.0 %)" in (
        common.cpu_vs_recorded("relay", 1260.0, doc)
    )
    assert "no recorded figure for 'dkim'" in common.cpu_vs_recorded("dkim", 1.0, doc)


def test_a_doc_without_the_table_is_said_so_not_crashed_on(tmp_path: Path) -> None:
    doc = tmp_path / "bench.md"
    doc.write_text("# Benchmarks\n")
    common = bench_common()
    with pytest.raises(ValueError, match="no CPU-per-message table"):
        common.recorded_cpu(doc)
    assert "CPU 300 µs/msg (no recorded figure:" in common.cpu_vs_recorded("ingest", 300.0, doc)

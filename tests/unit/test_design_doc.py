"""The design document the code cites is in the repo, and every citation resolves."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITATION = re.compile(r"DESIGN §(\d+)")
OLD = "SPEC " + "§"  # the spec outside the repo (spelt so that this file is not a hit)


def tracked_text_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return [ROOT / p for p in out if not p.startswith(("docs/bench/", "tests/data/"))]


def sections(text: str) -> set[str]:
    return set(re.findall(r"^## (\d+)\. ", text, re.MULTILINE))


def test_every_design_citation_names_a_section_of_docs_design() -> None:
    known = sections((ROOT / "docs" / "DESIGN.md").read_text())
    assert {str(n) for n in range(1, 15)} <= known
    cited: dict[str, set[str]] = {}
    stale: list[str] = []
    for path in tracked_text_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
        rel = str(path.relative_to(ROOT))
        for n in CITATION.findall(text):
            cited.setdefault(n, set()).add(rel)
        if OLD in text:
            stale.append(rel)
    assert [] == stale, "cite docs/DESIGN.md as `DESIGN §N`, not the spec outside the repo"
    assert {} == {n: files for n, files in cited.items() if n not in known}
    assert len(cited) >= 10  # the code does cite it

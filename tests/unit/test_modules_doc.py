"""docs/MODULES.md: its config examples load, and the smallest module in it is the one
the integration tests run (tests/module_examples.py: Block)."""

from __future__ import annotations

import re
from pathlib import Path

from empath.config.load import loads_config

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "MODULES.md").read_text()


def test_every_ron_example_binds_to_the_config_schema() -> None:
    blocks = re.findall(r"```ron\n(.*?)```", DOC, flags=re.S)
    assert len(blocks) >= 4
    for block in blocks:
        text = block.strip().rstrip(",")
        if not text.startswith("modules:"):
            text = f"modules: [ {text} ]"
        config = loads_config(f"Empath( {text} )")
        assert config.modules


def test_the_smallest_module_is_the_one_the_tests_load() -> None:
    [first] = re.findall(r"```python\n(# mypkg/filters.py.*?)```", DOC, flags=re.S)
    source = (ROOT / "tests" / "module_examples.py").read_text()
    body = first.split("class Block:", 1)[1].split("async def on_rcpt_to", 1)[0]
    assert body in source

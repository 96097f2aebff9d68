"""No module imports from a layer above its own.

The order is written once, in docs/DESIGN.md ("Layers"): one line per layer, lowest
first, each naming packages or modules of ``empath``.  A module belongs to the longest
name that contains it; it may import from its own entry and from lower layers, never
from a sibling on its own line or from anything above.  Every import counts: at the
top, inside functions, and under ``TYPE_CHECKING`` (a type-only import upward is still a
dependency a reader has to hold in their head).  Every module must be placed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "empath"
DESIGN = ROOT / "docs" / "DESIGN.md"


def layer_order(text: str) -> list[list[str]]:
    """The ```layers fenced block of the design document, lowest layer first."""
    match = re.search(r"^```layers\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert match, "docs/DESIGN.md has no ```layers block"
    lines = (line.split("#", 1)[0].split() for line in match.group(1).splitlines())
    return [line for line in lines if line]


def module_name(src: Path, path: Path) -> str:
    parts = path.relative_to(src.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(src: Path, path: Path, known: set[str]) -> set[str]:
    """The ``empath`` modules ``path`` imports (``from empath.x import y`` counts
    ``empath.x.y`` when that is a module, else ``empath.x``)."""
    found: set[str] = set()
    own = module_name(src, path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "empath")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "empath":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return found


def entry_of(module: str, entries: dict[str, int]) -> str | None:
    """The longest layer entry containing ``module`` (``empath`` itself is the root)."""
    parts = module.split(".")[1:]
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in entries:
            return name
    return "empath" if not parts and "empath" in entries else None


def violations(src: Path, order: list[list[str]]) -> list[str]:
    """Every module not placed, and every import of a sibling's or a higher layer's."""
    entries = {name: level for level, line in enumerate(order) for name in line}
    assert len(entries) == sum(len(line) for line in order), "an entry is listed twice"
    found = {module_name(src, p): p for p in sorted(src.rglob("*.py"))}
    out = [f"{m} is in no layer" for m in found if entry_of(m, entries) is None]
    for module, path in found.items():
        own = entry_of(module, entries)
        if own is None:
            continue
        for target in sorted(imports(src, path, set(found))):
            other = entry_of(target, entries)
            if other is None:
                out.append(f"{module} imports {target}, which is in no layer")
            elif other != own and entries[other] >= entries[own]:
                out.append(f"{module} ({own}) imports {target} ({other})")
    return out


def test_every_module_imports_only_its_own_layer_entry_or_lower_ones() -> None:
    assert [] == violations(SRC, layer_order(DESIGN.read_text()))


def test_an_upward_or_sibling_import_is_reported_in_any_form(tmp_path: Path) -> None:
    """The rule itself, on a made-up tree: imports of a higher layer (even type-only) or
    of a sibling on the same line (even lazy, even ``from empath import x``) are
    reported, as is a module in no layer; relative and downward imports are not."""
    order = layer_order("```layers\nlow\nmid other  # siblings\nhigh\n```\n")
    assert [["low"], ["mid", "other"], ["high"]] == order
    pkg = tmp_path / "empath"
    (pkg / "mid").mkdir(parents=True)
    for name in ("__init__", "low", "other", "high", "mid/__init__"):
        (pkg / f"{name}.py").write_text("")
    (pkg / "mid" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from empath.high import x\n"
    )
    (pkg / "mid" / "b.py").write_text("def f():\n    from empath import other\n")
    (pkg / "mid" / "c.py").write_text("from . import a\nfrom empath.low import y\n")
    (pkg / "stray.py").write_text("")
    assert [
        "empath is in no layer",
        "empath.stray is in no layer",
        "empath.mid.a (mid) imports empath.high (high)",
        "empath.mid.b (mid) imports empath.other (other)",
    ] == violations(pkg, order)

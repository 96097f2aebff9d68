"""Per-message dataclasses whose ``__init__`` is written out (``init=False``): mypyc runs a
hand-written ``__init__`` natively but builds a dataclass through the interpreted one
``dataclasses`` generates (~60 ns against ~190, or 300+ frozen: issue 20).  Written out,
it must still be the one ``dataclasses`` would generate."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType

import pytest

MODULES = (
    "empath.smtp.replies",
    "empath.smtp.events",
    "empath.smtp.parsing",
    "empath.smtp.client_types",
    "empath.delivery.classify",
    "empath.delivery.transition",
    "empath.delivery.attempt",
    "empath.transport.outbound",
    "empath.spool.recovery",
    "empath.spool.writer",
)


def interpreted(name: str) -> ModuleType:
    """The module as Python source: in the compiled build (whose directory holds the .py
    files too) a fresh copy run from its .py, since a compiled ``__init__`` keeps no
    annotations and checks its arguments' types.  What is checked is the source."""
    module = importlib.import_module(name)
    path = Path(module.__file__ or "")
    if path.suffix == ".py":
        return module
    source = path.with_name(path.name.split(".", 1)[0] + ".py")
    spec = importlib.util.spec_from_file_location(f"{name}__source", source)
    assert spec is not None and spec.loader is not None
    copy = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = copy  # dataclasses looks its module up
    spec.loader.exec_module(copy)
    return copy


def written_out() -> list[type]:
    found = []
    for module in map(interpreted, MODULES):
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and obj.__module__ == module.__name__
                and dataclasses.is_dataclass(obj)
                and not obj.__dataclass_params__.init  # type: ignore[attr-defined]
            ):
                found.append(obj)
    return found


def test_the_hot_records_write_their_init_out() -> None:
    names = {cls.__name__ for cls in written_out()}
    assert {"Reply", "Transaction", "AttemptResult", "Transition", "PoolKey"} <= names
    assert len(names) >= 21


@pytest.mark.parametrize("cls", written_out(), ids=lambda c: c.__qualname__)
def test_a_written_out_init_takes_the_fields_in_order_with_their_defaults(cls: type) -> None:
    params = list(inspect.signature(cls).parameters.values())
    fields = dataclasses.fields(cls)
    assert [(f.name, f.default) for f in fields] == [
        (p.name, dataclasses.MISSING if p.default is p.empty else p.default) for p in params
    ]
    assert [str(f.type) for f in fields] == [str(p.annotation) for p in params]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)


@pytest.mark.parametrize("cls", written_out(), ids=lambda c: c.__qualname__)
def test_a_written_out_init_sets_every_field(cls: type) -> None:
    fields = dataclasses.fields(cls)
    values = {f.name: object() for f in fields}
    made = cls(**values)
    assert values == {f.name: getattr(made, f.name) for f in fields}
    positional = cls(*values.values())
    assert values == {f.name: getattr(positional, f.name) for f in fields}
    if cls.__dataclass_params__.eq:  # type: ignore[attr-defined]
        assert made == positional == dataclasses.replace(made)

"""Per-message dataclasses whose ``__init__`` is written out (``init=False``): mypyc runs a
hand-written ``__init__`` natively but builds a dataclass through the interpreted one
``dataclasses`` generates (~60 ns against ~190, or 300+ frozen: issue 20).  Written out,
it must still be the one ``dataclasses`` would generate."""

from __future__ import annotations

import dataclasses
import importlib
import inspect

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


def written_out() -> list[type]:
    found = []
    for name in MODULES:
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and obj.__module__ == name
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

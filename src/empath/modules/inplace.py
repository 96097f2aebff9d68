"""Running a hook's coroutine that never suspends to its end, without StopIteration.

``coro.send(None)`` is how Python code steps a coroutine, and the step that returns
raises ``StopIteration`` carrying the value.  For the module host's in-place calls
(hooks whose code never awaits, run once per SMTP stage) that exception was most of
the call's cost: compiled code records a traceback entry for it and restores the
exception state (~4k of ~6k machine instructions per call, measured with callgrind).
An ``await`` does not raise: the interpreter's SEND takes a finishing coroutine's
value as a plain return.  So a :class:`Runner` is a long-lived generator that awaits
(``yield from``) each coroutine sent to it and yields back ``(DONE, value)``; it is
never resumed past the end, so no StopIteration is made.

This module stays interpreted (not in pyproject's compile list): the ``yield from``
of a coroutine needs a generator flagged by ``types.coroutine``.
"""

from __future__ import annotations

import types
from collections.abc import Coroutine, Generator
from typing import Any, Final

__all__ = ["Runner", "SuspendedError"]

DONE: Final = object()  # the first item of what the runner yields for a finished call


class SuspendedError(RuntimeError):
    """A coroutine run by a :class:`Runner` suspended (it was closed)."""


@types.coroutine
def _run_each() -> Generator[Any, Any, None]:
    out: Any = None
    while True:
        coro = yield out
        out = (DONE, (yield from coro))


class Runner:
    """Runs coroutines that never suspend to their end, one at a time."""

    __slots__ = ("_gen",)

    def __init__(self) -> None:
        self._gen = self._fresh()

    @staticmethod
    def _fresh() -> Generator[Any, Any, None]:
        gen = _run_each()
        gen.send(None)  # to its first yield
        return gen

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """``coro``'s return value; what it raises propagates; :class:`SuspendedError` (and
        the coroutine closed) if it suspends after all."""
        gen = self._gen
        try:
            out = gen.send(coro)
        except BaseException:
            self._gen = self._fresh()  # the exception ended the generator
            raise
        if type(out) is tuple and out[0] is DONE:
            return out[1]
        self._gen = self._fresh()
        gen.close()  # closes the suspended coroutine too
        raise SuspendedError("a coroutine expected to finish in one step suspended")

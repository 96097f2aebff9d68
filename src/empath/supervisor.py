"""One owner for every background task (structured concurrency).

Theory of operation
-------------------
The composition root owns one :class:`Supervisor`; every task that outlives the
call that starts it - the delivery attempts, the retention janitor, the spool
compactor, the cluster heartbeat, the OTLP push, a pooled connection's polite
QUIT - is started with :meth:`Supervisor.spawn` (components receive the bound
method as a :data:`Spawn`).  So nothing runs that the daemon does not know about:

* shutdown is one call, :meth:`Supervisor.shutdown` - after the graceful steps
  (listeners closed, in-flight deliveries drained), whatever is still running is
  cancelled and awaited, with a deadline;
* a task that ends with an exception is never lost: the supervisor logs it at
  ERROR with its name and traceback, counts it, and - for a task spawned
  ``essential=True`` (a loop the daemon cannot do without, such as the janitor
  or the compactor) - tells the root through ``on_crash``, which stops the daemon
  (exit code 1, so the service manager restarts it) rather than run on without it.

Unlike ``asyncio.TaskGroup``, one crashing delivery does not cancel its siblings:
the failure is handled where it is reported, the rest go on.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

from empath.logs import get_logger

log = get_logger("system", __name__)

T = TypeVar("T")


class Spawn(Protocol):
    """Start ``coro`` as a supervised task (what components receive)."""

    def __call__(
        self, coro: Coroutine[Any, Any, T], *, name: str, essential: bool = False
    ) -> asyncio.Task[T]: ...


class Track(Protocol):
    """Start ``coro`` as a task that its caller awaits and whose outcome it handles
    (a DNS query shared by its waiters, a spilled body's commit): the supervisor only
    keeps it, so shutdown cancels it like any other."""

    def __call__(self, coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]: ...


def untracked(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """A plain task, for a component used without a daemon (tests, tools)."""
    return asyncio.get_running_loop().create_task(coro, name=name)


CrashHandler = Callable[[str, BaseException], None]


class Supervisor:
    """The set of running background tasks; see the module docstring."""

    __slots__ = ("_essential", "_on_crash", "_tasks", "crashes")

    def __init__(self, on_crash: CrashHandler | None = None) -> None:
        self._on_crash = on_crash
        self._tasks: set[asyncio.Task[Any]] = set()
        self._essential: set[asyncio.Task[Any]] = set()
        self.crashes = 0

    def __repr__(self) -> str:
        return (
            f"<Supervisor running={len(self._tasks)} essential={len(self._essential)} "
            f"crashes={self.crashes}>"
        )

    def __len__(self) -> int:
        return len(self._tasks)

    def names(self) -> list[str]:
        return sorted(t.get_name() for t in self._tasks)

    def spawn(
        self, coro: Coroutine[Any, Any, T], *, name: str, essential: bool = False
    ) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        if essential:
            self._essential.add(task)
        task.add_done_callback(self._done)
        return task

    def track(self, coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
        """See :class:`Track`: kept for shutdown, its exception is its caller's."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        essential = task in self._essential
        self._essential.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        self.crashes += 1
        log.error(
            "Background task crashed",
            task=task.get_name(),
            essential=essential,
            error=repr(exc),
            traceback="".join(traceback.format_exception(exc)).rstrip(),
        )
        if essential and self._on_crash is not None:
            self._on_crash(task.get_name(), exc)

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Cancel every task still running and wait for them (at most ``timeout_s``)."""
        tasks = list(self._tasks)
        self._essential.clear()  # cancelled on purpose: not a crash to report
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=timeout_s)
        if pending:
            log.warn(
                "Background tasks did not stop in time",
                tasks=sorted(t.get_name() for t in pending),
            )

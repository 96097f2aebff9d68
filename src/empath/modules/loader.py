"""Loading ``modules`` entries (DESIGN §14) into the host's filters.

A Python entry names ``package.module:Factory``; the module is imported, the factory
called once with ``arguments`` (a dict, or the original's list of strings), and the
hooks the object has are looked up once here, through an explicit table
(:data:`HOOK_ATTRIBUTES`), so a call is a plain method call later.  A factory that
declares a keyword-only parameter ``empath`` also receives a :class:`ModuleContext`
(the daemon's resolver and host name): that is how the in-tree ``dnsbl`` module uses
Empath's own DNS resolver.  Any failure — no such module, no such attribute, an
import error, a factory that raises, an object with no hook — is a
:class:`~empath.errors.ConfigError` naming the entry (``modules[0] (mypkg.x:Y)``):
start-up fails, a reload is refused and the old set kept.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from empath.clock import Clock
from empath.config.model import ModuleConfig, ModuleTimeouts
from empath.errors import ConfigError
from empath.modules.api import Changes, DeliveryEvent, Message, OnError, Reply, Session
from empath.modules.host import (
    CONTINUE,
    CallTimeouts,
    Filter,
    Hook,
    ModuleHost,
    ModuleStats,
    Verdict,
    never_suspends,
)
from empath.modules.inplace import Runner, SuspendedError

__all__ = ["HOOK_ATTRIBUTES", "ModuleContext", "PythonFilter", "build_host", "load_filter"]

HOOK_ATTRIBUTES: Final[dict[Hook, str]] = {hook: hook.value for hook in Hook}


@dataclass(frozen=True, slots=True)
class ModuleContext:
    """What Empath lends a module that asks for it (``def __init__(self, arguments,
    *, empath)``): the daemon's DNS resolver (``txt``/``a`` lookups) and host name."""

    resolver: Any
    hostname: str


def _as_verdict(value: object, hook: Hook) -> Verdict:
    if value is None:
        return CONTINUE
    if isinstance(value, Reply):
        return Verdict(value)
    if isinstance(value, Changes) and hook is Hook.DATA:
        return Verdict(changes=value)
    raise TypeError(
        f"{hook.value} returned {type(value).__name__}; expected None, a Reply"
        + (" or Changes" if hook is Hook.DATA else "")
    )


class PythonFilter:
    """A Python module behind the :class:`~empath.modules.host.Filter` interface."""

    kind: Literal["module", "milter"] = "module"

    def __init__(self, cfg: ModuleConfig, obj: object) -> None:
        self.label = cfg.label
        self.timeouts = call_timeouts(cfg.timeouts)
        self.on_error: OnError = cfg.on_error
        self.obj = obj
        self._runner = Runner()  # runs the immediate hooks' coroutines (modules/inplace.py)
        self._fns: dict[Hook, Callable[..., Awaitable[object]]] = {}
        for hook, attr in HOOK_ATTRIBUTES.items():
            fn = getattr(obj, attr, None)
            if fn is None:
                continue
            if not inspect.iscoroutinefunction(fn):
                raise TypeError(f"{attr} must be an async method (async def {attr}(...))")
            self._fns[hook] = fn
        self.hooks = frozenset(self._fns)
        # hooks whose calls finish without suspending: the host runs them in place
        self.immediate = frozenset(h for h, fn in self._fns.items() if never_suspends(fn))

    def budget(self, hook: Hook) -> float:
        if hook is Hook.DATA:
            return self.timeouts.end_of_message_secs
        return self.timeouts.command_secs

    async def stage(self, hook: Hook, session: Session, arg: str) -> Verdict:
        fn = self._fns[hook]
        if hook is Hook.CONNECT:
            return _as_verdict(await fn(session), hook)
        return _as_verdict(await fn(session, arg), hook)

    async def data(self, session: Session, message: Message) -> Verdict:
        return _as_verdict(await self._fns[Hook.DATA](session, message), Hook.DATA)

    def now(self, hook: Hook, session: Session | None, arg: Any) -> Verdict:
        """A hook in ``immediate`` (its code never awaits): its coroutine's one step."""
        fn = self._fns[hook]
        if hook is Hook.DELIVERY:
            coro = fn(arg)
        elif hook is Hook.CONNECT:
            coro = fn(session)
        else:
            coro = fn(session, arg)
        try:
            value = self._runner.run(coro)  # type: ignore[arg-type]
        except SuspendedError:
            raise RuntimeError(f"{hook.value} suspended although its code never awaits") from None
        return CONTINUE if hook is Hook.DELIVERY else _as_verdict(value, hook)

    async def delivery(self, event: DeliveryEvent) -> None:
        await self._fns[Hook.DELIVERY](event)

    async def session_closed(self, session: Session) -> None:
        return None

    async def close(self) -> None:
        closer = getattr(self.obj, "close", None)
        if closer is not None and inspect.iscoroutinefunction(closer):
            await closer()

    def status(self) -> dict[str, Any]:
        return {}


class _LoadError(Exception):
    """A module that cannot be loaded (made a ConfigError naming the entry by the caller)."""


def _where(index: int, cfg: ModuleConfig) -> str:
    return f"modules[{index}] ({cfg.label})"


def _load_python(index: int, cfg: ModuleConfig, context: ModuleContext) -> PythonFilter:
    assert cfg.name is not None
    module_name, _, attr = cfg.name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise _LoadError(f"no Python module named {exc.name!r}") from None
        raise _LoadError(f"importing {module_name!r} failed: {exc!r}") from None
    except Exception as exc:
        raise _LoadError(f"importing {module_name!r} failed: {exc!r}") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise _LoadError(f"{module_name!r} has no callable {attr!r}")
    args = cfg.arguments if cfg.arguments is not None else {}
    try:
        params = inspect.signature(factory).parameters
        keyword_only = inspect.Parameter.KEYWORD_ONLY
        wants_context = "empath" in params and params["empath"].kind is keyword_only
        obj = factory(args, empath=context) if wants_context else factory(args)
    except Exception as exc:
        raise _LoadError(f"{attr}({args!r}) raised {exc!r}") from None
    try:
        flt = PythonFilter(cfg, obj)
    except TypeError as exc:
        raise _LoadError(f"{exc}") from None
    if not flt.hooks:
        names = ", ".join(HOOK_ATTRIBUTES.values())
        raise _LoadError(f"the object has none of the hooks ({names})")
    return flt


def call_timeouts(t: ModuleTimeouts) -> CallTimeouts:
    return CallTimeouts(t.connect_secs, t.command_secs, t.end_of_message_secs)


def load_filter(
    index: int, cfg: ModuleConfig, context: ModuleContext, stats: ModuleStats
) -> Filter:
    if cfg.type == "Python":
        return _load_python(index, cfg, context)
    if cfg.type == "Milter":
        from empath.modules.milter.filter import MilterFilter

        assert cfg.address is not None
        return MilterFilter(
            cfg.label,
            cfg.address,
            call_timeouts(cfg.timeouts),
            cfg.on_error,
            stats,
            hostname=context.hostname,
        )
    raise ConfigError(f"{cfg.type} modules cannot be loaded", path=_where(index, cfg))


def build_host(
    configs: tuple[ModuleConfig, ...],
    context: ModuleContext,
    stats: ModuleStats,
    clock: Clock | None = None,
    *,
    file: str = "<config>",
) -> ModuleHost:
    """Every entry loaded (ConfigError naming the first that fails); ``clock`` times
    the calls."""
    filters: list[Filter] = []
    for i, cfg in enumerate(configs):
        try:
            filters.append(load_filter(i, cfg, context, stats))
        except _LoadError as exc:
            raise ConfigError(str(exc), file=file, path=_where(i, cfg)) from None
    return ModuleHost(filters, stats, clock=clock)

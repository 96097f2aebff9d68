"""The DKIM key thread: jobs queued while it works are signed as one batch and
answered with one loop wake-up; one job's failure is that job's alone."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from empath.dkim import signer as signer_module
from empath.dkim.sign import Unsigned
from empath.dkim.signer import KeyThread


def job(tag: bytes) -> list[Unsigned]:
    # the thread only hands these to the key operation, which reads .digest
    return [Unsigned(spec=None, head=b"", digest=tag)]  # type: ignore[arg-type]


def test_jobs_queued_while_the_thread_signs_go_as_one_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()
    started = threading.Event()

    def op(u: Unsigned) -> bytes:
        if u.digest == b"first":
            started.set()
            release.wait(10)
        if u.digest == b"bad":
            raise ValueError("no key")
        return b"sig:" + u.digest

    batches: list[int] = []
    real = signer_module._deliver

    def counting(results: Sequence[signer_module._Done]) -> None:
        batches.append(len(results))
        real(list(results))

    monkeypatch.setattr(signer_module, "_deliver", counting)
    keys = KeyThread(op)

    async def main() -> list[object]:
        first = keys.sign(job(b"first"))
        assert await asyncio.to_thread(started.wait, 10)
        rest = [keys.sign(job(tag)) for tag in (b"a", b"bad", b"c")]
        release.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    try:
        got = asyncio.run(main())
    finally:
        keys.close()
    assert [[b"sig:first"], [b"sig:a"], "no key", [b"sig:c"]] == [
        str(g) if isinstance(g, Exception) else g for g in got
    ]
    assert [1, 3] == batches


def test_a_closed_key_thread_refuses_new_jobs() -> None:
    keys = KeyThread(lambda u: b"")
    keys.close()

    async def main() -> None:
        keys.sign(job(b"x"))

    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(main())

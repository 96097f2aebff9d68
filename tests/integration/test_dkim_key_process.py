"""The DKIM key process (dkim/keyproc.py) with real child processes: the fields it
makes verify with dkimpy and are byte for byte what dkim/sign.py makes in-process;
each request is answered as soon as it is signed; a child that dies fails only what
was in flight and the next request starts a new one; an error answer fails that
request; close ends it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import dkim
import pytest
import uvloop
from cryptography.hazmat.primitives.asymmetric import ed25519

from empath.dkim import keys
from empath.dkim.keyproc import CHILD, KeyProcess, KeyProcessError
from empath.dkim.sign import SignSpec, sign
from empath.transport.acceptance import split_message
from tests.dkim_support import ERRING_KEY_PROCESS

T = TypeVar("T")
RSA_KEY = keys.generate("rsa-sha256")
ED_KEY = keys.generate("ed25519-sha256")
FIELDS = [b"From: Alice <a@example.org>\r\n", b"To: b@example.net\r\n",
          b"Subject: key\r\n process\r\n"]  # fmt: skip


def spec(key: keys.PrivateKey, canon: str = "relaxed/relaxed") -> SignSpec:
    ed = isinstance(key, ed25519.Ed25519PrivateKey)
    return SignSpec("example.org", "e" if ed else "r",
                    "ed25519-sha256" if ed else "rsa-sha256",
                    key, canon, ("from", "to", "subject"), frozenset({"from"}))  # fmt: skip


RSA, ED = spec(RSA_KEY), spec(ED_KEY)


def dns(name: bytes, timeout: int = 5) -> bytes:
    key = {b"r._domainkey.example.org.": RSA_KEY, b"e._domainkey.example.org.": ED_KEY}[name]
    return keys.txt_value(key).encode()


def verifies(made: Sequence[bytes], body: bytes) -> list[bool]:
    """dkimpy's verdict on each signature of the signed message, top first."""
    message = b"".join(made) + b"".join(FIELDS) + b"\r\n" + body
    d = dkim.DKIM(message)
    return [bool(d.verify(idx=i, dnsfunc=dns)) for i in range(len(made))]


def test_signatures_made_in_one_turn_verify_and_equal_the_in_process_ones() -> None:
    proc = KeyProcess()
    bodies = [b"body %d\r\n\r\n" % i for i in range(5)]
    specs = [RSA, ED, spec(RSA_KEY, "simple/simple")]

    async def main() -> list[list[bytes]]:
        return await asyncio.gather(*(proc.sign(FIELDS, b, specs, 1700000000) for b in bodies))

    try:
        got = asyncio.run(main())
    finally:
        proc.close()
    assert [sign(FIELDS, b, specs, 1700000000) for b in bodies] == got
    assert [[True] * 3] * 5 == [verifies(made, b) for made, b in zip(got, bodies, strict=True)]


@pytest.mark.parametrize(
    "head",
    [b"".join(FIELDS), b"Received: by x\r\n\tfor y\r\n" + b"".join(FIELDS),
     b"X-Odd: a\nb\rc\r\n" + b"".join(FIELDS)],  # lone LF and CR: part of the line
)  # fmt: skip
def test_a_message_as_received_is_signed_like_its_split_fields(head: bytes) -> None:
    """``sign_raw``: the child reads the fields of a plain header block itself; the
    fields it sends back, joined, are what sign() makes for the split message, and
    put in front of the received bytes they verify with dkimpy."""
    proc = KeyProcess()
    body = b"body\r\n\r\n"
    raw = head + b"\r\n" + body
    specs = [RSA, ED, spec(ED_KEY, "simple/simple")]

    async def main() -> bytes:
        return await proc.sign_raw(raw, len(head), specs, 1700000000)

    try:
        got = asyncio.run(main())
    finally:
        proc.close()
    fields = [f.raw for f in split_message(raw)[0]]
    assert b"".join(sign(fields, body, specs, 1700000000)) == got
    if b"X-Odd" not in head:  # (dkimpy refuses a message with a lone LF)
        signed = dkim.DKIM(got + raw)
        assert [True] * 3 == [bool(signed.verify(idx=i, dnsfunc=dns)) for i in range(3)]


def test_a_message_does_not_wait_for_the_requests_read_after_it() -> None:
    """Answered one by one: the first message of a burst of RSA-signed ones comes back
    while most of the others are still being signed."""
    proc = KeyProcess()
    done: list[float] = []

    async def main() -> None:
        await proc.sign(FIELDS, b"warm\r\n", [RSA], 1)  # the child and its key are ready
        futs = [proc.sign(FIELDS, b"x%d\r\n" % i, [RSA] * 4, 1) for i in range(40)]
        for f in futs:
            f.add_done_callback(lambda _f: done.append(time.monotonic()))
        await asyncio.gather(*futs)

    try:
        asyncio.run(main())
    finally:
        proc.close()
    # 160 RSA-2048 signatures take ~40 ms of CPU; the first answer needs 4 of them
    # (answered all in one write, as before, every future would finish in one read)
    assert done[-1] - done[0] > 0.005


def test_a_killed_child_is_replaced_by_the_next_request() -> None:
    proc = KeyProcess()

    async def main() -> tuple[int | None, int | None]:
        assert [True] == verifies(await proc.sign(FIELDS, b"x\r\n", [ED], 1), b"x\r\n")
        first = proc.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)  # the child this test started
        while proc.pid == first:  # the loop sees end of file and forgets it
            await asyncio.sleep(0.01)
        # the key and spec are sent to the new child
        assert [True] == verifies(await proc.sign(FIELDS, b"x\r\n", [ED], 1), b"x\r\n")
        return first, proc.pid

    try:
        first, second = asyncio.run(main())
    finally:
        proc.close()
    assert first != second and second is not None


def test_a_child_that_dies_fails_the_requests_in_flight(tmp_path: Path) -> None:
    # reads one request's first byte and exits without answering
    proc = KeyProcess([sys.executable, "-c", "import os; os.read(0, 1)"])

    async def main() -> None:
        with pytest.raises(KeyProcessError, match="exited"):
            await proc.sign(FIELDS, b"x\r\n", [RSA], 1)

    try:
        asyncio.run(main())
    finally:
        proc.close()


def test_an_error_answer_fails_that_request() -> None:
    proc = KeyProcess([sys.executable, "-c", ERRING_KEY_PROCESS])

    async def main() -> None:
        with pytest.raises(KeyProcessError, match="HSM unplugged"):
            await proc.sign(FIELDS, b"x\r\n", [RSA], 1)

    try:
        asyncio.run(main())
    finally:
        proc.close()


def test_close_ends_the_child_and_later_requests_fail() -> None:
    proc = KeyProcess()

    async def main() -> int:
        await proc.sign(FIELDS, b"x\r\n", [ED], 1)
        pid = proc.pid
        assert pid is not None
        proc.close()
        with pytest.raises(KeyProcessError, match="closed"):
            await proc.sign(FIELDS, b"y\r\n", [ED], 1)
        return pid

    pid = asyncio.run(main())
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped by close(): no such child any more


def test_a_child_that_stops_answering_is_killed_and_its_requests_fail() -> None:
    """A hung child (reads, never answers) is taken for dead after the answer limit:
    what waited fails (the session answers 451) and the child is killed and reaped."""
    hung = "import os, time\nos.read(0, 1)\ntime.sleep(60)"
    proc = KeyProcess([sys.executable, "-c", hung], answer_limit_s=0.2)

    async def main() -> tuple[float, int | None]:
        fut = proc.sign(FIELDS, b"x\r\n", [RSA], 1)
        pid = proc.pid
        start = time.monotonic()
        with pytest.raises(KeyProcessError, match=r"no answer in 0\.2 s"):
            await fut
        return time.monotonic() - start, pid

    try:
        waited, pid = asyncio.run(main())
    finally:
        proc.close()
    assert 0.15 < waited < 10
    assert pid is not None and proc.pid is None
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # killed and reaped


def _on_uvloop(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main()`` on uvloop, the daemon's event loop (app.py); an exception a
    callback raised (uvloop logs it and goes on) fails the test."""
    loop = uvloop.new_event_loop()
    raised: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: raised.append(context))
    try:
        result = loop.run_until_complete(main())
    finally:
        loop.close()
    assert [] == [c.get("exception") for c in raised]
    return result


def test_on_uvloop_a_dead_child_fails_its_requests_and_the_next_one_starts_anew() -> None:
    """uvloop's remove_reader/remove_writer answer None (asyncio's say True/False):
    forgetting a dead child must not trip over that (the compiled module checked the
    answer against asyncio's stub, raised TypeError, and left the request waiting)."""
    proc = KeyProcess([sys.executable, "-c", "import os; os.read(0, 1)"])

    async def main() -> None:
        with pytest.raises(KeyProcessError, match="exited"):
            await asyncio.wait_for(proc.sign(FIELDS, b"x\r\n", [RSA], 1), 10)
        proc._argv = [sys.executable, "-c", CHILD]  # a working child from now on
        assert [True] == verifies(
            await asyncio.wait_for(proc.sign(FIELDS, b"x\r\n", [ED], 1), 10), b"x\r\n"
        )

    try:
        _on_uvloop(main)
    finally:
        proc.close()


def test_on_uvloop_requests_bigger_than_the_pipe_are_written_out_and_answered() -> None:
    """More than the pipe holds in one turn: the rest waits for writability, then the
    writer is removed again (on uvloop, where removing it answers None)."""
    proc = KeyProcess()
    bodies = [b"%d" % i + b"x" * 60_000 + b"\r\n" for i in range(6)]  # ~360 KB

    async def main() -> list[list[bytes]]:
        futs = [proc.sign(FIELDS, b, [ED], 1) for b in bodies]
        got = await asyncio.wait_for(asyncio.gather(*futs), 30)
        await asyncio.sleep(0.05)  # a writer left behind would spin here
        return got

    try:
        got = _on_uvloop(main)
    finally:
        proc.close()
    assert [[True]] * 6 == [verifies(made, b) for made, b in zip(got, bodies, strict=True)]
    assert not proc._writing

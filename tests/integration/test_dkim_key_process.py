"""The DKIM key process (dkim/keyproc.py) with real child processes: what it signs
verifies with the public keys; a child that dies fails only what was in flight and
the next request starts a new one; an error answer fails that request; close ends it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from empath.dkim import keys
from empath.dkim.keyproc import KeyProcess, KeyProcessError
from empath.dkim.sign import SignSpec, Unsigned
from tests.dkim_support import ERRING_KEY_PROCESS

RSA_KEY = keys.generate("rsa-sha256")
ED_KEY = keys.generate("ed25519-sha256")


def unsigned(key: keys.PrivateKey, text: bytes) -> Unsigned:
    alg = "ed25519-sha256" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa-sha256"
    spec = SignSpec("example.org", "s", alg, key, "relaxed/relaxed", ("from",), frozenset())  # type: ignore[arg-type]
    return Unsigned(spec, b"", hashlib.sha256(text).digest())


def verifies(u: Unsigned, signature: bytes) -> bool:
    key = u.spec.key
    try:
        if isinstance(key, rsa.RSAPrivateKey):
            key.public_key().verify(signature, u.digest, padding.PKCS1v15(),
                                    Prehashed(hashes.SHA256()))  # fmt: skip
        else:
            key.public_key().verify(signature, u.digest)
    except InvalidSignature:
        return False
    return True


def test_requests_made_in_one_turn_are_all_signed_and_verify() -> None:
    proc = KeyProcess()

    async def main() -> list[list[bytes]]:
        jobs = [[unsigned(RSA_KEY, b"m%d" % i), unsigned(ED_KEY, b"m%d" % i)] for i in range(5)]
        got = await asyncio.gather(*(proc.sign(job) for job in jobs))
        assert all(verifies(u, s) for job, sigs in zip(jobs, got, strict=True)
                   for u, s in zip(job, sigs, strict=True))  # fmt: skip
        return got

    try:
        got = asyncio.run(main())
    finally:
        proc.close()
    assert [[256, 64]] * 5 == [[len(s) for s in sigs] for sigs in got]


def test_a_killed_child_is_replaced_by_the_next_request() -> None:
    proc = KeyProcess()

    async def main() -> tuple[int | None, int | None]:
        job = [unsigned(ED_KEY, b"x")]
        assert verifies(job[0], (await proc.sign(job))[0])
        first = proc.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)  # the child this test started
        while proc.pid == first:  # the loop sees end of file and forgets it
            await asyncio.sleep(0.01)
        assert verifies(job[0], (await proc.sign(job))[0])  # key sent to the new child
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
            await proc.sign([unsigned(RSA_KEY, b"x")])

    try:
        asyncio.run(main())
    finally:
        proc.close()


def test_an_error_answer_fails_that_request() -> None:
    proc = KeyProcess([sys.executable, "-c", ERRING_KEY_PROCESS])

    async def main() -> None:
        with pytest.raises(KeyProcessError, match="HSM unplugged"):
            await proc.sign([unsigned(RSA_KEY, b"x")])

    try:
        asyncio.run(main())
    finally:
        proc.close()


def test_close_ends_the_child_and_later_requests_fail() -> None:
    proc = KeyProcess()

    async def main() -> int:
        await proc.sign([unsigned(ED_KEY, b"x")])
        pid = proc.pid
        assert pid is not None
        proc.close()
        with pytest.raises(KeyProcessError, match="closed"):
            await proc.sign([unsigned(ED_KEY, b"y")])
        return pid

    pid = asyncio.run(main())
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped by close(): no such child any more

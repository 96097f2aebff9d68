"""Seeded generators of hostile SMTP input for the fuzz and abuse torture tests.

A *script* is what one client sends in one session: command lines (well-formed,
then randomly mutated), DATA bodies and BDAT chunks (with fake end-of-data
sequences, bare CR/LF, NUL, long lines, stuffed dots), ending with a real end of
data and QUIT so a live server closes the session.  :func:`session_script` counts
its inputs (command lines + bodies) so a test can report how many it tried.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

# The SMTP-smuggling family (SEC Consult, CVE-2023-51764/-51765/-51766, and the
# aio-libs/aiosmtpd test case ``\n.\r\n``): sequences some server might take for
# the end of data.  Only ``<CRLF>.<CRLF>`` is one (RFC 5321 §4.1.1.4).
FAKE_ENDS: Final[dict[str, bytes]] = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.LF": b"\r.\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "CRLF.LF": b"\r\n.\n",
    "CR.CR": b"\r.\r",
    "LF.CR": b"\n.\r",
    "CRLF.CRCRLF": b"\r\n.\r\r\n",
    "CRLF.NUL.CRLF": b"\r\n.\x00\r\n",
    "CRLF.NULCRLF": b"\r\n\x00.\r\n",
    "CRLF.SP.CRLF": b"\r\n. \r\n",  # not an end either (a line " " after a dot); legal
}

_VERBS: Final = (
    b"EHLO", b"HELO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"BDAT", b"RSET", b"NOOP",
    b"QUIT", b"VRFY", b"EXPN", b"HELP", b"STARTTLS", b"AUTH PLAIN", b"XCLIENT", b"",
)  # fmt: skip
_PATHS: Final = (
    b"<a@x.example>", b"<>", b"<postmaster>", b"<PostMaster>", b'<"q u\\"o"@x.example>',
    b"<a@[127.0.0.1]>", b"<a@[IPv6:::1]>", "<ü@bücher.example>".encode(), b"a@x.example",
    b"<@r1,@r2:a@x.example>", b"<a@x.example", b"<<a@x.example>>", b"<a@>", b"<@x>",
    b"<a@victim.test>", b"<b@victim.test>",
)  # fmt: skip
_PARAMS: Final = (
    b" SIZE=100", b" BODY=8BITMIME", b" BODY=7BIT", b" SMTPUTF8", b" NOTIFY=SUCCESS,DELAY",
    b" ORCPT=rfc822;a@x.example", b" SIZE=99999999999999999999", b" RET=HDRS",
    b" ENVID=x", b" FOO=bar", b" SIZE=", b" =", b"  ",
)  # fmt: skip
_NOISE: Final = (b"\r", b"\n", b"\x00", b".", b"\xff", b" ", b":", b"<", b">", b"\t", b"\r\n")


@dataclass(frozen=True, slots=True)
class Script:
    data: bytes
    inputs: int  # command lines + message bodies in it


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One to three random edits: flip, insert noise, delete, duplicate, truncate, case."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(6)
        pos = rng.randrange(len(out) + 1)
        if op == 0 and out:
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        elif op == 1:
            out[pos:pos] = rng.choice(_NOISE)
        elif op == 2 and out:
            del out[pos : pos + rng.randint(1, 4)]
        elif op == 3:
            out[pos:pos] = out[pos : pos + rng.randint(1, 40)] * rng.randint(1, 3)
        elif op == 4:
            del out[pos:]
        else:
            out = bytearray(bytes(out).swapcase())
    return bytes(out)


def command_line(rng: random.Random) -> bytes:
    verb = rng.choice(_VERBS)
    arg = b""
    if verb in (b"MAIL FROM:", b"RCPT TO:"):
        arg = rng.choice(_PATHS) + b"".join(rng.choice(_PARAMS) for _ in range(rng.randrange(3)))
    elif verb in (b"EHLO", b"HELO", b"VRFY", b"EXPN"):
        arg = b" " + rng.choice((b"client.example", b"[127.0.0.1]", b"", b"x" * 600, b"a b"))
    elif verb == b"BDAT":
        arg = b" " + rng.choice((b"0", b"5", b"x", b"-1", b"99999999999999999999999", b"3 LAST"))
    line = verb + arg
    if rng.random() < 0.5:
        line = mutate(rng, line)
    return line + rng.choice((b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""))


def body(rng: random.Random) -> bytes:
    """DATA content (unstuffed intent, some lines stuffed or not), without the end."""
    lines = [b"Subject: fuzz %d" % rng.randrange(10**6), b""]
    for _ in range(rng.randrange(1, 12)):
        kind = rng.randrange(10)
        if kind == 0:
            lines.append(b"." + b"x" * rng.randrange(5))
        elif kind == 1:
            lines.append(b"y" * rng.choice((998, 999, 1000, 1500)))
        elif kind == 2:
            lines.append(b"Received: from hop%d" % rng.randrange(100))
        else:
            lines.append(bytes(rng.randrange(32, 127) for _ in range(rng.randrange(60))))
    text = b"\r\n".join(lines) + b"\r\n"
    if rng.random() < 0.4:
        cut = rng.randrange(len(text) + 1)
        text = text[:cut] + rng.choice(list(FAKE_ENDS.values())) + text[cut:]
    if rng.random() < 0.3:
        text = mutate(rng, text)
    return text


def session_script(rng: random.Random, rcpt_domain: bytes = b"victim.test") -> Script:
    """One session: a transaction (often well-formed), random commands, a real end."""
    parts: list[bytes] = []
    inputs = 0
    if rng.random() < 0.8:
        parts.append(b"EHLO fuzz.example\r\n")
        inputs += 1
    for _ in range(rng.randrange(1, 4)):
        if rng.random() < 0.6:
            parts += [b"MAIL FROM:<fuzz@x.example>\r\n", b"RCPT TO:<r@" + rcpt_domain + b">\r\n"]
            inputs += 2
            if rng.random() < 0.8:
                parts += [b"DATA\r\n", body(rng) + b".\r\n"]
            else:
                chunk = body(rng)
                parts += [b"BDAT %d LAST\r\n" % len(chunk), chunk]
            inputs += 2
        for _ in range(rng.randrange(8)):
            parts.append(command_line(rng))
            inputs += 1
    # leave any DATA state and say goodbye
    parts.append(b"\r\n.\r\nQUIT\r\n")
    return Script(b"".join(parts), inputs)


def splits(rng: random.Random, data: bytes) -> list[bytes]:
    """`data` cut into random reads (mostly small, sometimes all at once)."""
    if rng.random() < 0.2:
        return [data]
    out = []
    i = 0
    while i < len(data):
        n = rng.choice((1, 2, 3, 7, 64, 500, 4096))
        out.append(data[i : i + n])
        i += n
    return out

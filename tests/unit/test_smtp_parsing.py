"""Command lines, RFC 5321 paths and ESMTP parameters."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from empath.errors import SmtpProtocolError
from empath.smtp.parsing import (
    Body,
    MailFrom,
    RcptTo,
    Verb,
    parse_bdat,
    parse_command,
    parse_helo,
    parse_mail,
    parse_rcpt,
)


@pytest.mark.parametrize(
    ("line", "verb", "arg"),
    [
        (b"EHLO client.example", Verb.EHLO, "client.example"),
        (b"ehlo client.example", Verb.EHLO, "client.example"),
        (b"MaIl FROM:<a@b.c>", Verb.MAIL, "FROM:<a@b.c>"),
        (b"DATA", Verb.DATA, ""),
        (b"quit", Verb.QUIT, ""),
        (b"STARTTLS", Verb.STARTTLS, ""),
        (b"BDAT 100 LAST", Verb.BDAT, "100 LAST"),
    ],
)
def test_parse_command_table(line: bytes, verb: Verb, arg: str) -> None:
    """Verbs are case-insensitive; the argument is kept as sent."""
    cmd = parse_command(line)
    assert (verb, arg) == (cmd.verb, cmd.arg)


@pytest.mark.parametrize(
    ("line", "code", "enhanced"),
    [
        (b"XYZZY", 500, "5.5.1"),
        (b"", 500, "5.5.1"),
        (b"\xff\xfe", 500, "5.5.2"),
        (b"MAILFROM:<a@b>", 500, "5.5.1"),
        (b"\xc3\xa9HLO x", 500, "5.5.1"),
    ],
)
def test_parse_command_rejects(line: bytes, code: int, enhanced: str) -> None:
    """Unknown verbs get 500 5.5.1, undecodable lines 500 5.5.2."""
    with pytest.raises(SmtpProtocolError) as info:
        parse_command(line)
    assert (code, enhanced) == (info.value.code, info.value.enhanced)


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("FROM:<a@b.example>", MailFrom("a@b.example")),
        ("from:<a@b.example>", MailFrom("a@b.example")),
        ("FROM: <a@b.example>", MailFrom("a@b.example")),
        ("FROM:<>", MailFrom("")),
        ('FROM:<"john smith"@b.example>', MailFrom('"john smith"@b.example')),
        ('FROM:<"a\\"b"@b.example>', MailFrom('"a\\"b"@b.example')),
        ("FROM:<a@[192.0.2.1]>", MailFrom("a@[192.0.2.1]")),
        ("FROM:<a@[IPv6:2001:db8::1]>", MailFrom("a@[IPv6:2001:db8::1]")),
        ("FROM:<@relay1.example,@relay2.example:a@b.example>", MailFrom("a@b.example")),
        ("FROM:<a.b+tag@sub.b-c.example>", MailFrom("a.b+tag@sub.b-c.example")),
        ("FROM:<a@b.example> SIZE=1000", MailFrom("a@b.example", size=1000)),
        ("FROM:<a@b.example> BODY=8BITMIME", MailFrom("a@b.example", body=Body.EIGHT_BIT_MIME)),
        ("FROM:<a@b.example> body=7bit", MailFrom("a@b.example", body=Body.SEVEN_BIT)),
        ("FROM:<ü@bü.example> SMTPUTF8", MailFrom("ü@bü.example", smtputf8=True)),
        (
            "FROM:<a@b.example> RET=HDRS ENVID=QQ314159 AUTH=<>",
            MailFrom("a@b.example", ret="HDRS", envid="QQ314159"),
        ),
    ],
)
def test_parse_mail_accepts(arg: str, expected: MailFrom) -> None:
    """RFC 5321 §4.1.2 reverse paths and MAIL parameters."""
    assert expected == parse_mail(arg)


@pytest.mark.parametrize(
    ("arg", "code", "enhanced"),
    [
        ("FROM:a@b.example", 501, "5.1.7"),
        ("FROM:<a@b.example", 501, "5.1.7"),
        ("FROM:<a@@b.example>", 501, "5.1.7"),
        ("FROM:<a..b@b.example>", 501, "5.1.7"),
        ("FROM:<.a@b.example>", 501, "5.1.7"),
        ("FROM:<a@-b.example>", 501, "5.1.7"),
        ("FROM:<a@b.example.>", 501, "5.1.7"),
        ("FROM:<a@[999.1.1.1]>", 501, "5.1.7"),
        ("FROM:<a@[IPv6:zz::1]>", 501, "5.1.7"),
        ("FROM:<a b@b.example>", 501, "5.1.7"),
        ("FROM:<noatsign>", 501, "5.1.7"),
        ("FROM:<" + "a" * 65 + "@b.example>", 501, "5.1.7"),
        ("FROM:<" + "ü" * 33 + "@b.example> SMTPUTF8", 501, "5.1.7"),  # 66 octets
        ("TO:<a@b.example>", 501, "5.5.4"),
        ("FROM:<a@b.example> SIZE=abc", 501, "5.5.4"),
        ("FROM:<a@b.example> SIZE=", 501, "5.5.4"),
        ("FROM:<a@b.example> SIZE=1 SIZE=2", 501, "5.5.4"),
        ("FROM:<a@b.example> BODY=BINARYMIME", 555, "5.5.4"),
        ("FROM:<a@b.example> BODY=9BIT", 501, "5.5.4"),
        ("FROM:<a@b.example> SMTPUTF8=yes", 501, "5.5.4"),
        ("FROM:<a@b.example> FOO=bar", 555, "5.5.4"),
        ("FROM:<a@b.example> =x", 501, "5.5.4"),
        ("FROM:<ü@b.example>", 553, "5.6.7"),
    ],
)
def test_parse_mail_rejects(arg: str, code: int, enhanced: str) -> None:
    """Bad sender syntax → 501 5.1.7; bad parameters → 501/555 5.5.4; UTF-8 needs SMTPUTF8."""
    with pytest.raises(SmtpProtocolError) as info:
        parse_mail(arg)
    assert (code, enhanced) == (info.value.code, info.value.enhanced)


@pytest.mark.parametrize(
    ("arg", "smtputf8", "expected"),
    [
        ("TO:<x@y.example>", False, RcptTo("x@y.example")),
        ("to:<x@Y.Example>", False, RcptTo("x@Y.Example")),
        ("TO:<Postmaster>", False, RcptTo("postmaster")),
        (
            "TO:<x@y.example> NOTIFY=SUCCESS,FAILURE",
            False,
            RcptTo("x@y.example", "SUCCESS,FAILURE"),
        ),
        (
            "TO:<x@y.example> ORCPT=rfc822;x@y.example",
            False,
            RcptTo("x@y.example", orcpt="rfc822;x@y.example"),
        ),
        ("TO:<пользователь@пример.рф>", True, RcptTo("пользователь@пример.рф")),
    ],
)
def test_parse_rcpt_accepts(arg: str, smtputf8: bool, expected: RcptTo) -> None:
    """Forward paths with NOTIFY/ORCPT; UTF-8 when the transaction said SMTPUTF8."""
    assert expected == parse_rcpt(arg, smtputf8=smtputf8)


@pytest.mark.parametrize(
    ("arg", "smtputf8", "code", "enhanced"),
    [
        ("TO:<>", False, 553, "5.1.3"),
        ("TO:<x@>", False, 553, "5.1.3"),
        ("TO:x@y.example", False, 553, "5.1.3"),
        ("FROM:<x@y.example>", False, 501, "5.5.4"),
        ("TO:<x@y.example> NOTIFY=SOMETIMES", False, 501, "5.5.4"),
        ("TO:<x@y.example> NOTIFY=NEVER,DELAY", False, 501, "5.5.4"),
        ("TO:<x@y.example> SIZE=10", False, 555, "5.5.4"),
        ("TO:<пользователь@пример.рф>", False, 553, "5.6.7"),
    ],
)
def test_parse_rcpt_rejects(arg: str, smtputf8: bool, code: int, enhanced: str) -> None:
    """Bad recipient syntax → 553 5.1.3; unknown parameters → 555 5.5.4."""
    with pytest.raises(SmtpProtocolError) as info:
        parse_rcpt(arg, smtputf8=smtputf8)
    assert (code, enhanced) == (info.value.code, info.value.enhanced)


@pytest.mark.parametrize(
    ("arg", "expected"), [("10", (10, False)), ("0 LAST", (0, True)), ("7 last", (7, True))]
)
def test_parse_bdat(arg: str, expected: tuple[int, bool]) -> None:
    """BDAT <size> [LAST]."""
    assert expected == parse_bdat(arg)


@pytest.mark.parametrize("arg", ["", "x", "-1", "10 FIRST", "1 LAST x", "1" * 21])
def test_parse_bdat_rejects(arg: str) -> None:
    """A BDAT without a valid size is a 501."""
    with pytest.raises(SmtpProtocolError) as info:
        parse_bdat(arg)
    assert 501 == info.value.code


def test_parse_helo() -> None:
    """EHLO needs one printable word."""
    assert "client.example" == parse_helo("client.example")
    assert "[192.0.2.1]" == parse_helo(" [192.0.2.1] ")
    for bad in ("", "   ", "a b", "a\tb"):
        with pytest.raises(SmtpProtocolError):
            parse_helo(bad)


@given(st.binary(max_size=200), st.booleans())
def test_parser_only_raises_protocol_errors_on_random_bytes(data: bytes, utf8: bool) -> None:
    """Whatever the bytes, the command and argument parsers either succeed or raise
    SmtpProtocolError (never another exception)."""
    for parse in (
        lambda: parse_command(data),
        lambda: parse_mail(data.decode("utf-8", "replace")),
        lambda: parse_rcpt(data.decode("utf-8", "replace"), smtputf8=utf8),
        lambda: parse_mail("FROM:<" + data.decode("latin-1") + ">"),
        lambda: parse_rcpt("TO:<" + data.decode("latin-1") + "> NOTIFY=x", smtputf8=utf8),
        lambda: parse_bdat(data.decode("latin-1")),
        lambda: parse_helo(data.decode("latin-1")),
    ):
        try:
            parse()
        except SmtpProtocolError:
            pass


_atext = st.sampled_from(list("abcXYZ019!#$%&'*+/=?^_`{|}~-"))
_atom = st.lists(_atext, min_size=1, max_size=8).map("".join)
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True)


@given(st.lists(_atom, min_size=1, max_size=3), st.lists(_label, min_size=1, max_size=3))
def test_generated_valid_addresses_round_trip(atoms: list[str], labels: list[str]) -> None:
    """Any dot-string@domain built from the RFC grammar parses back to itself."""
    addr = ".".join(atoms) + "@" + ".".join(labels)
    assert addr == parse_rcpt(f"TO:<{addr}>", smtputf8=False).recipient
    assert addr == parse_mail(f"FROM:<{addr}>").sender

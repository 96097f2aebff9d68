"""DSN composition (empath.delivery.bounce): who gets one, and what it looks like on the wire."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from empath.delivery.bounce import (
    DsnAction,
    DsnKind,
    DsnMessage,
    RecipientReport,
    build_dsn,
    diagnostic_code,
    header_block,
    should_send_dsn,
)
from empath.spool.model import Envelope
from empath.testing.dsn import parse_dsn

NOW = 1_700_000_200.0
HOST = "mx.example.com"
HEADERS = (
    b"Received: from client.example.org ([192.0.2.1]) by mx.example.com with ESMTP id 01HX;\r\n"
    b"\tTue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"Subject: quarterly report\r\n"
    b"Message-ID: <abc@example.org>\r\n"
)
BODY = HEADERS + b"\r\nHello Bob,\r\n\r\nsee attached.\r\n"


def envelope(sender: str = "alice@example.org", **kw: object) -> Envelope:
    fields: dict[str, object] = {
        "recipients": ("bob@x.com", "carol@x.com", "dave@y.org"),
        "received_at": 1_700_000_000.0,
    }
    fields.update(kw)
    return Envelope(sender=sender, **fields)  # type: ignore[arg-type]


def failed(address: str = "bob@x.com", **kw: object) -> RecipientReport:
    fields: dict[str, object] = {
        "status": "5.1.1",
        "remote_mta": "mx1.x.com:25",
        "diagnostic_code": "smtp; 550 5.1.1 <bob@x.com>: Recipient address rejected",
        "last_attempt_at": NOW - 60,
    }
    fields.update(kw)
    return RecipientReport(address, DsnAction.FAILED, **fields)  # type: ignore[arg-type]


def delayed(address: str = "dave@y.org") -> RecipientReport:
    return RecipientReport(
        address,
        DsnAction.DELAYED,
        "4.4.1",
        remote_mta="mx.y.org",
        diagnostic_code="smtp; 421 4.4.1 try again later",
        last_attempt_at=NOW - 30,
        will_retry_until=NOW + 86_400,
    )


def dsn(
    kind: DsnKind = DsnKind.FAILED,
    reports: tuple[RecipientReport, ...] = (failed(),),
    env: Envelope | None = None,
    headers: bytes = HEADERS,
    **kw: object,
) -> DsnMessage:
    args: dict[str, object] = {
        "kind": kind,
        "original_id": "01HXQUEUEID0000000000000000",
        "envelope": env or envelope(),
        "recipients": reports,
        "original_headers": headers,
        "hostname": HOST,
        "reporting_mta": None,
        "postmaster": "postmaster@<hostname>",
        "now": NOW,
        "message_id_factory": lambda: "01HYDSNID",
    }
    args.update(kw)
    return build_dsn(**args)  # type: ignore[arg-type]


def unitext_decode(value: str) -> str:
    """RFC 6533 utf-8-addr-unitext -> address (\\x{HH} escapes)."""
    return re.sub(r"\\x\{([0-9A-F]+)\}", lambda m: chr(int(m[1], 16)), value)


# -- who gets a DSN --------------------------------------------------------------------


@pytest.mark.parametrize("sender", ["", "<>"])
def test_no_dsn_is_sent_to_the_null_sender(sender: str) -> None:
    assert False is should_send_dsn(envelope(sender))
    with pytest.raises(ValueError, match="null sender"):
        dsn(env=envelope(sender))


def test_no_dsn_is_sent_about_a_dsn() -> None:
    assert False is should_send_dsn(envelope(is_dsn=True))
    with pytest.raises(ValueError, match="about a DSN"):
        dsn(env=envelope(is_dsn=True))


def test_auto_submitted_mail_with_a_real_sender_still_gets_a_dsn() -> None:
    """RFC 5321 §6.1 obliges the MTA; only the null path is exempt (module docstring)."""
    auto = HEADERS + b"Auto-Submitted: auto-generated\r\n"
    assert True is should_send_dsn(envelope())
    assert b"Auto-Submitted: auto-generated" in parse_dsn(dsn(headers=auto).body).original_headers


def test_reports_must_match_the_kind_and_be_present() -> None:
    with pytest.raises(ValueError, match="at least one"):
        dsn(reports=())
    with pytest.raises(ValueError, match="action"):
        dsn(kind=DsnKind.DELAYED, reports=(failed(),))
    with pytest.raises(ValueError, match="action"):
        dsn(kind=DsnKind.EXPIRED, reports=(delayed(),))


# -- structure -------------------------------------------------------------------------


def test_failure_dsn_is_a_three_part_multipart_report_from_mailer_daemon() -> None:
    msg = dsn()
    parsed = parse_dsn(msg.body)
    assert ("", ("alice@example.org",), True, False) == (
        msg.sender,
        msg.recipients,
        msg.is_dsn,
        msg.smtputf8,
    )
    assert "delivery-status" == parsed.report_type
    h = parsed.headers
    assert "Mail Delivery System <MAILER-DAEMON@mx.example.com>" == h["from"]
    assert "alice@example.org" == h["to"]
    assert "Undelivered Mail Returned to Sender" == h["subject"]
    assert "auto-replied" == h["auto-submitted"]
    assert "1.0" == h["mime-version"]
    assert "<01HYDSNID@mx.example.com>" == h["message-id"] == msg.message_id
    assert datetime.fromtimestamp(NOW, UTC) == parsedate_to_datetime(h["date"])
    assert b"\r\nAuto-Submitted: auto-replied\r\n" in msg.body


def test_delivery_status_fields_describe_message_and_recipient() -> None:
    parsed = parse_dsn(dsn(original_envelope_id="ENV123").body)
    pm = parsed.per_message
    assert "dns; mx.example.com" == pm["reporting-mta"]
    assert "ENV123" == pm["original-envelope-id"]
    assert datetime.fromtimestamp(1_700_000_000.0, UTC) == parsedate_to_datetime(pm["arrival-date"])
    (rcpt,) = parsed.per_recipient
    assert "rfc822; bob@x.com" == rcpt["final-recipient"]
    assert "failed" == rcpt["action"]
    assert "5.1.1" == rcpt["status"]
    assert "dns; mx1.x.com" == rcpt["remote-mta"]  # the port is not part of an MTA name
    assert "smtp; 550 5.1.1 <bob@x.com>: Recipient address rejected" == rcpt["diagnostic-code"]
    assert datetime.fromtimestamp(NOW - 60, UTC) == parsedate_to_datetime(rcpt["last-attempt-date"])
    assert "will-retry-until" not in rcpt


def test_reporting_mta_setting_overrides_the_hostname() -> None:
    parsed = parse_dsn(dsn(reporting_mta="relay.example.net").body)
    assert "dns; relay.example.net" == parsed.per_message["reporting-mta"]


def test_only_the_affected_recipients_are_listed() -> None:
    reports = (failed("bob@x.com"), failed("carol@x.com", diagnostic_code="550 5.1.1 gone"))
    parsed = parse_dsn(dsn(reports=reports).body)
    finals = [r["final-recipient"] for r in parsed.per_recipient]
    assert ["rfc822; bob@x.com", "rfc822; carol@x.com"] == finals
    assert "dave@y.org" not in parsed.explanation
    assert "bob@x.com" in parsed.explanation and "carol@x.com" in parsed.explanation
    assert "smtp; 550 5.1.1 gone" == parsed.per_recipient[1]["diagnostic-code"]


def test_human_part_quotes_the_remote_reply() -> None:
    text = parse_dsn(dsn().body).explanation
    assert "mx1.x.com replied: 550 5.1.1 <bob@x.com>: Recipient address rejected" in " ".join(
        text.split()
    )


def test_delayed_dsn_says_delayed_and_until_when() -> None:
    msg = dsn(kind=DsnKind.DELAYED, reports=(delayed(),))
    parsed = parse_dsn(msg.body)
    (rcpt,) = parsed.per_recipient
    assert "Delayed Mail (still being retried)" == parsed.headers["subject"]
    assert "delayed" == rcpt["action"]
    assert "4.4.1" == rcpt["status"]
    assert datetime.fromtimestamp(NOW + 86_400, UTC) == parsedate_to_datetime(
        rcpt["will-retry-until"]
    )
    assert "still being retried" in parsed.explanation


@pytest.mark.parametrize(
    "kind", [DsnKind.FAILED, DsnKind.EXHAUSTED, DsnKind.EXPIRED, DsnKind.DELETED]
)
def test_every_final_kind_is_an_undelivered_mail_report(kind: DsnKind) -> None:
    parsed = parse_dsn(dsn(kind=kind).body)
    assert "Undelivered Mail Returned to Sender" == parsed.headers["subject"]
    assert "failed" == parsed.per_recipient[0]["action"]


def test_malformed_status_falls_back_to_the_generic_code_of_the_action() -> None:
    parsed = parse_dsn(dsn(reports=(failed(status="bogus"),)).body)
    assert "5.0.0" == parsed.per_recipient[0]["status"]


def test_local_error_without_remote_reply_uses_a_private_diagnostic_type() -> None:
    report = failed(remote_mta="", diagnostic_code=diagnostic_code(None, "connection refused"))
    (rcpt,) = parse_dsn(dsn(reports=(report,)).body).per_recipient
    assert "X-Empath; connection refused" == rcpt["diagnostic-code"]
    assert "remote-mta" not in rcpt


def test_diagnostic_code_helper_formats_smtp_replies() -> None:
    assert "smtp; 550 5.1.1 no such user" == diagnostic_code(550, "5.1.1 no such user")
    assert "smtp; 550 5.1.1 no such user" == diagnostic_code(550, "550 5.1.1 no such user")
    assert "smtp; 451 4.3.0 a b" == diagnostic_code(451, "4.3.0 a\r\nb")
    assert "" == diagnostic_code(None, "  ")


def test_headers_part_is_the_original_header_block() -> None:
    assert HEADERS == header_block(BODY)
    assert HEADERS == parse_dsn(dsn(headers=header_block(BODY)).body).original_headers


def test_eight_bit_headers_of_a_plain_message_travel_quoted_printable() -> None:
    latin1 = b"Subject: caf\xe9 =?x\r\nFrom: a@b.c\r\n"
    msg = dsn(headers=latin1)
    assert False is msg.smtputf8
    assert msg.body.isascii()
    assert latin1 == parse_dsn(msg.body).original_headers


def test_non_ascii_addresses_use_the_rfc6533_global_forms() -> None:
    env = envelope("ålice@exämple.org", recipients=("bøb x@x.com",), smtputf8=True)
    utf8_headers = "From: ålice@exämple.org\r\nSubject: héllo\r\n".encode()
    msg = dsn(env=env, reports=(failed("bøb x@x.com"),), headers=utf8_headers)
    parsed = parse_dsn(msg.body)
    assert True is msg.smtputf8
    assert "global-delivery-status" == parsed.report_type
    assert b"Content-Type: message/global-headers\r\n" in msg.body
    assert utf8_headers == parsed.original_headers
    final = parsed.per_recipient[0]["final-recipient"]
    assert "utf-8; bøb\\x{20}x@x.com" == final
    assert "bøb x@x.com" == unitext_decode(final.removeprefix("utf-8; "))
    env_delivered = msg.envelope(received_at=NOW)
    assert (True, True, True, "") == (
        env_delivered.is_dsn,
        env_delivered.smtputf8,
        env_delivered.body_8bit,
        env_delivered.sender,
    )


def test_ascii_dsn_for_an_smtputf8_message_with_ascii_headers_stays_7bit() -> None:
    msg = dsn(env=envelope(smtputf8=True))
    assert (False, True) == (msg.smtputf8, msg.body.isascii())


def test_boundary_never_occurs_in_the_content() -> None:
    tricky = HEADERS + b"X-Trap: =_empath_01HYDSNID =_empath_01HYDSNID_1\r\n"
    msg = dsn(headers=tricky)
    parsed = parse_dsn(msg.body)
    assert tricky == parsed.original_headers
    boundary = re.search(rb'boundary="([^"]+)"', msg.body)
    assert boundary is not None
    assert b"=_empath_01HYDSNID_2" == boundary[1]


def test_same_inputs_give_the_same_bytes() -> None:
    assert dsn().body == dsn().body


def test_overlong_and_bare_lf_header_lines_are_made_wire_safe() -> None:
    raw = b"X-Long: " + b"a" * 3000 + b"\r\nX-Bare: one\ntwo\rthree\r\n"
    msg = dsn(headers=raw)
    parsed = parse_dsn(msg.body)  # checks CRLF-only and <= 998 octets per line
    unfolded = parsed.original_headers.replace(b"\r\n ", b"")
    assert b"X-Long: " + b"a" * 3000 + b"\r\n" == unfolded.split(b"X-Bare")[0]


def test_long_diagnostics_are_folded_near_78_columns() -> None:
    text = "550 5.7.1 " + " ".join(f"word{i}" for i in range(200))
    msg = dsn(reports=(failed(diagnostic_code=text),))
    block = msg.body.split(b"Diagnostic-Code:")[1].split(b"\r\n\r\n")[0]
    assert all(len(line) <= 78 for line in block.split(b"\r\n"))
    assert f"smtp; {text}" == parse_dsn(msg.body).per_recipient[0]["diagnostic-code"]


# -- header_block ----------------------------------------------------------------------


def test_header_block_stops_at_the_first_empty_line() -> None:
    assert b"A: 1\r\nB: 2\r\n" == header_block(b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nmore\r\n")


def test_header_block_of_a_body_without_separator_is_the_whole_body() -> None:
    assert b"A: 1\r\nB: 2\r\n" == header_block(b"A: 1\r\nB: 2")


def test_header_block_of_a_body_without_headers_is_empty() -> None:
    assert b"" == header_block(b"\r\nbody only\r\n")


def test_header_block_is_capped_at_a_line_boundary() -> None:
    body = b"".join(b"X-H%03d: %s\r\n" % (i, b"v" * 50) for i in range(100)) + b"\r\nbody"
    block = header_block(body, limit_bytes=1000)
    assert len(block) <= 1000
    assert block.endswith(b"\r\n")
    assert body.startswith(block)
    assert len(block) > 1000 - 70  # every whole line that fits was kept


# -- properties ------------------------------------------------------------------------

_local = st.text(
    st.characters(
        codec="utf-8",
        exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp"),
        exclude_characters="@<>?\\",
    ),
    min_size=1,
    max_size=40,
)
_domain = st.from_regex(r"[a-z0-9]{1,20}\.(com|org|de)", fullmatch=True)
_address = st.builds(lambda lp, d: f"{lp}@{d}", _local, _domain)
_diagnostic = st.one_of(
    st.text(max_size=300),
    st.text(max_size=6000),
    st.builds(lambda w: "550 5.1.1 " + w, st.text(st.characters(codec="ascii"), min_size=1000)),
)
_header_line = st.builds(
    lambda n, v: f"X-{n}: {v}".encode(),
    st.from_regex(r"[A-Za-z]{1,20}", fullmatch=True),
    st.text(st.characters(codec="ascii", min_codepoint=32, max_codepoint=126), max_size=900),
)


@given(
    addresses=st.lists(_address, min_size=1, max_size=8, unique=True),
    diagnostics=st.lists(_diagnostic, min_size=8, max_size=8),
    sender=_address,
    header_lines=st.lists(_header_line, max_size=10),
    kind=st.sampled_from(list(DsnKind)),
)
def test_any_dsn_is_wire_safe_and_parses_back(
    addresses: list[str],
    diagnostics: list[str],
    sender: str,
    header_lines: list[bytes],
    kind: DsnKind,
) -> None:
    action = kind.action
    reports = tuple(
        RecipientReport(
            a,
            action,
            "4.4.7" if action is DsnAction.DELAYED else "5.0.0",
            remote_mta="mx.example.net",
            diagnostic_code=d,
            last_attempt_at=NOW,
            will_retry_until=NOW + 3600,
        )
        for a, d in zip(addresses, diagnostics, strict=False)
    )
    headers = b"".join(line + b"\r\n" for line in header_lines)
    env = envelope(sender, recipients=(*addresses, "other@example.com"))
    msg = dsn(kind=kind, reports=reports, env=env, headers=headers)
    body = msg.body
    assert b"\r" not in body.replace(b"\r\n", b"")
    assert b"\n" not in body.replace(b"\r\n", b"")
    assert max(len(line) for line in body.split(b"\r\n")) <= 998
    parsed = parse_dsn(body)
    assert headers == parsed.original_headers
    assert len(addresses) == len(parsed.per_recipient)
    finals = []
    for rcpt in parsed.per_recipient:
        kind_, _, addr = rcpt["final-recipient"].partition("; ")
        finals.append(unitext_decode(addr) if kind_ == "utf-8" else addr)
        assert action.value == rcpt["action"]
        assert ("will-retry-until" in rcpt) is (action is DsnAction.DELAYED)
    assert addresses == finals
    assert "other@example.com" not in parsed.explanation
    ascii_only = sender.isascii() and all(a.isascii() for a in addresses)
    assert ascii_only is (not msg.smtputf8)
    assert ascii_only is body.isascii()


@pytest.mark.parametrize(
    ("kind", "given", "want"),
    [
        (DsnKind.DELAYED, "4.2.0", "4.2.0"),  # a greylisting reply stays transient
        (DsnKind.DELAYED, "5.2.0", "4.2.0"),
        (DsnKind.FAILED, "5.1.1", "5.1.1"),
        (DsnKind.EXHAUSTED, "4.2.0", "5.2.0"),  # giving up makes it permanent
        (DsnKind.EXPIRED, "4.4.7", "5.4.7"),
        (DsnKind.DELETED, "2.0.0", "5.0.0"),
    ],
)
def test_status_class_agrees_with_the_action_of_every_kind(
    kind: DsnKind, given: str, want: str
) -> None:
    """RFC 3464 §2.3.3/§2.3.4 with RFC 3463 §3.1: failed is 5.x.x, delayed is 4.x.x."""
    report = RecipientReport("bob@x.com", kind.action, given, "mx1.x.com", "smtp; 4xx", NOW)
    (rcpt,) = parse_dsn(dsn(kind=kind, reports=(report,)).body).per_recipient
    assert (kind.action.value, want) == (rcpt["action"], rcpt["status"])


@pytest.mark.parametrize(
    ("remote_mta", "want"),
    [
        ("192.0.2.1", "dns; [192.0.2.1]"),
        ("192.0.2.1:2525", "dns; [192.0.2.1]"),
        ("2001:db8::1", "dns; [IPv6:2001:db8::1]"),
        ("[192.0.2.7]:25", "dns; [192.0.2.7]"),
        ("mx1.x.com:25", "dns; mx1.x.com"),
    ],
)
def test_remote_mta_of_an_address_only_route_is_an_address_literal(
    remote_mta: str, want: str
) -> None:
    (rcpt,) = parse_dsn(dsn(reports=(failed(remote_mta=remote_mta),)).body).per_recipient
    assert want == rcpt["remote-mta"]

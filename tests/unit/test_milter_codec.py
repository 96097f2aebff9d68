"""The milter codec (sans-I/O): packets as libmilter's mfdef.h lays them out."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from empath.modules.milter import codec
from empath.modules.milter.codec import Act, Cmd, Kind, MilterProtocolError, Proto


def test_optneg_offers_version_6_every_action_and_every_step_flag() -> None:
    assert b"\x00\x00\x00\x0dO" + struct.pack(">III", 6, 0x1FF, 0x1FFFFF) == codec.optneg()


def test_connect_carries_host_family_port_and_address() -> None:
    assert b"\x00\x00\x00\x16Cunknown\x004\x30\x39127.0.0.1\x00" == codec.connect(
        "unknown", "127.0.0.1", 12345
    )
    assert codec.connect("h", "::1", 25).startswith(b"\x00\x00\x00\x0aCh\x006\x00\x19")


def test_macros_name_their_command_and_leave_out_empty_values() -> None:
    assert codec.encode(Cmd.MACRO, b"Mi\x00Q1\x00{mail_addr}\x00a@b\x00") == codec.macros(
        Cmd.MAIL, {"i": "Q1", "{auth_authen}": "", "{mail_addr}": "a@b"}
    )


def test_mail_and_rcpt_put_the_address_in_angle_brackets() -> None:
    assert codec.encode(Cmd.MAIL, b"<>\x00") == codec.mail("")
    assert codec.encode(Cmd.RCPT, b"<r@x.test>\x00") == codec.rcpt("r@x.test")


def test_a_body_is_cut_into_chunks_of_at_most_65535_octets() -> None:
    chunks = codec.body_chunks(b"x" * 140_000)
    assert [65535, 65535, 8930] == [len(c) - 5 for c in chunks]
    assert [] == codec.body_chunks(b"")


@given(
    st.lists(
        st.tuples(
            st.sampled_from([k.value for k in Kind if k.value.isalpha()]), st.binary(max_size=300)
        ),
        max_size=8,
    ),
    st.integers(min_value=1, max_value=50),
)
def test_the_reader_returns_the_same_packets_however_the_bytes_are_split(
    packets: list[tuple[bytes, bytes]], step: int
) -> None:
    stream = b"".join(struct.pack(">I", len(d) + 1) + c + d for c, d in packets)
    reader = codec.PacketReader()
    got: list[tuple[bytes, bytes]] = []
    for i in range(0, len(stream), step):
        got += reader.feed(stream[i : i + step])
    assert packets == got


def test_a_packet_claiming_to_be_huge_is_a_protocol_error() -> None:
    with pytest.raises(MilterProtocolError):
        codec.PacketReader().feed(struct.pack(">I", 1 << 30) + b"c")


@pytest.mark.parametrize(
    ("cmd", "data", "expected"),
    [
        (b"c", b"", codec.Response(Kind.CONTINUE)),
        (b"y", b"554 5.7.1 Gtube pattern\x00", codec.Response(Kind.REPLYCODE,
                                                              ("554 5.7.1 Gtube pattern",))),
        (b"h", b"X-Spam\x00Yes\x00", codec.Response(Kind.ADDHEADER, ("X-Spam", "Yes"))),
        (b"i", b"\x00\x00\x00\x01DKIM-Signature\x00 v=1\x00",
         codec.Response(Kind.INSHEADER, ("DKIM-Signature", " v=1"), 1)),
        (b"m", b"\x00\x00\x00\x02Subject\x00\x00", codec.Response(Kind.CHGHEADER,
                                                                  ("Subject", ""), 2)),
        (b"+", b"<new@x.test>\x00", codec.Response(Kind.ADDRCPT, ("<new@x.test>",))),
        (b"b", b"new body\r\n", codec.Response(Kind.REPLBODY, data=b"new body\r\n")),
    ],
)  # fmt: skip
def test_replies_decode_to_their_kind_and_arguments(
    cmd: bytes, data: bytes, expected: codec.Response
) -> None:
    assert expected == codec.decode_response(cmd, data)


@pytest.mark.parametrize(("cmd", "data"), [(b"Z", b""), (b"h", b"only-name\x00"),
                                           (b"y", b"550 no nul"), (b"i", b"\x00\x01")])  # fmt: skip
def test_malformed_replies_are_protocol_errors(cmd: bytes, data: bytes) -> None:
    with pytest.raises(MilterProtocolError):
        codec.decode_response(cmd, data)


def test_negotiation_keeps_the_milters_skips_and_no_reply_steps() -> None:
    neg = codec.decode_optneg(struct.pack(">III", 6, Act.ADDHDRS, Proto.NOHELO | Proto.NR_HDR))
    assert neg.skips(Cmd.HELO) and not neg.skips(Cmd.MAIL)
    assert not neg.answers(Cmd.HEADER) and neg.answers(Cmd.BODY)
    assert neg.answers(Cmd.BODYEOB)  # end of message is always answered


def test_a_milter_asking_for_actions_we_did_not_offer_is_refused() -> None:
    with pytest.raises(MilterProtocolError, match="actions"):
        codec.decode_optneg(struct.pack(">III", 6, 0x400, 0))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("554 5.7.1 Gtube pattern", (554, "5.7.1", "Gtube pattern")),
        ("451 try later", (451, "", "try later")),
        ("550-5.7.1 first\r\n550 5.7.1 second", (550, "5.7.1", "first\nsecond")),
    ],
)
def test_replycode_text_splits_into_code_enhanced_code_and_lines(
    text: str, expected: tuple[int, str, str]
) -> None:
    assert expected == codec.parse_replycode(text)


def test_a_replycode_that_is_not_4xx_or_5xx_is_refused() -> None:
    with pytest.raises(MilterProtocolError):
        codec.parse_replycode("250 ok")

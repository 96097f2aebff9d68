"""On-disk record format of the file spool's log (versioned, checksummed, never pickle).

Theory of operation.  A segment file ``<spool>/log/<seq:010d>-<seed:08x>.seg``
is a sequence of records::

    +-------+--------+---------+------+-------+-------------+-----------------+
    | magic | crc32  | version | type | flags | payload_len | payload ...     |
    | 4 B   | 4 B LE | 1 B     | 1 B  | 2 B   | 4 B LE      | payload_len B   |
    +-------+--------+---------+------+-------+-------------+-----------------+

The CRC-32 covers everything after itself (the rest of the header and the
payload, one contiguous span) and is seeded with the segment's random ``seed``
(part of the file name).  The seed makes a record
that was copied into a message body by a client - e.g. someone mailing a spool
file - fail its checksum, so resynchronising after a corrupt region can never
"find" an attacker-supplied record inside a body and resurrect it as mail.

Message records (MSG, STATE, DEL) carry a payload of::

    message id (26 ASCII bytes) | json_len (4 B LE) | JSON header | raw body bytes

MSG's JSON holds the envelope, the unit states and where the body is (inline
after the JSON, or spilled to ``<spool>/bodies/<id>``); STATE's JSON is a full
snapshot of the units (newest wins); DEL has no JSON (a tombstone) and, where the
"body" would be, the ids of any further messages the same record forgets, 26 bytes
each (delivered messages' tombstones are gathered into one record: writer.py; a reader
that knows only the first id would bring the others back, delivered twice, never
lost).  SEGMENT is
the first record of every segment (its sequence number and where the previous
segment's valid data ends); PAD covers a quarantined region in place so a later
scan skips it silently.
"""

from __future__ import annotations

import enum
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import Any, Final

import orjson

from empath.spool.model import (
    Attempt,
    Envelope,
    RcptStatus,
    RecipientState,
    UnitState,
    UnitStatus,
)

MAGIC: Final = b"EmpR"
VERSION: Final = 1
HEADER: Final = struct.Struct("<4sIBBHI")  # magic, crc, version, type, flags, payload_len
HEADER_BYTES: Final = HEADER.size  # 16
_CRC_FROM: Final = 8  # the CRC covers everything after itself: header tail + payload
_TAIL: Final = struct.Struct("<BBHI")
_U32: Final = struct.Struct("<I")
ID_BYTES: Final = 26
MSG_PREFIX_BYTES: Final = ID_BYTES + _U32.size  # 30
MAX_PAYLOAD_BYTES: Final = 1 << 30  # sanity bound while resynchronising


class RecordType(enum.IntEnum):
    SEGMENT = 1
    MSG = 2
    STATE = 3
    DEL = 4
    PAD = 5


KNOWN_TYPES: Final = frozenset(int(t) for t in RecordType)


def segment_name(seq: int, seed: int) -> str:
    return f"{seq:010d}-{seed:08x}.seg"


def parse_segment_name(name: str) -> tuple[int, int] | None:
    """(seq, seed) of a segment file name, None when it is not one of ours."""
    if not name.endswith(".seg") or len(name) != 10 + 1 + 8 + 4 or name[10] != "-":
        return None
    try:
        return int(name[:10], 10), int(name[11:19], 16)
    except ValueError:
        return None


def frame(rtype: RecordType, payload: bytes, seed: int) -> bytes:
    """One complete record: header (with CRC) followed by payload."""
    tail = _TAIL.pack(VERSION, rtype, 0, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(tail, seed))
    return MAGIC + _U32.pack(crc) + tail + payload


def pad_header(payload_len: int, existing_payload: bytes | memoryview, seed: int) -> bytes:
    """A PAD header that makes ``existing_payload`` (already on disk) a valid, skippable record."""
    tail = _TAIL.pack(VERSION, RecordType.PAD, 0, payload_len)
    crc = zlib.crc32(existing_payload, zlib.crc32(tail, seed))
    return MAGIC + _U32.pack(crc) + tail


@dataclass(frozen=True, slots=True)
class RawRecord:
    """A record found in a segment whose checksum verified."""

    rtype: int
    version: int
    offset: int  # of the header, in the segment
    payload_start: int  # absolute offset of the payload in the segment
    end: int  # offset just past the record


def parse_at(buf: memoryview, offset: int, limit: int, seed: int) -> RawRecord | None:
    """The verified record starting at ``offset`` (ending at or before ``limit``), else None."""
    if offset + HEADER_BYTES > limit:
        return None
    magic, crc, version, rtype, _flags, plen = HEADER.unpack_from(buf, offset)
    if magic != MAGIC or plen > MAX_PAYLOAD_BYTES:
        return None
    start = offset + HEADER_BYTES
    end = start + plen
    if end > limit or zlib.crc32(buf[offset + _CRC_FROM : end], seed) != crc:
        return None
    return RawRecord(rtype=rtype, version=version, offset=offset, payload_start=start, end=end)


# --- message payloads ----------------------------------------------------------


# orjson writes the same compact UTF-8 JSON as json.dumps(separators=(",", ":"),
# ensure_ascii=False) at about a tenth of the cost.  The documents are built here as
# plain dicts with the fields in declaration order - exactly what the model's
# to_json() builds (tests/unit/test_spool_codec holds the two equal) - rather than
# handed to orjson as dataclasses: orjson looks for ``__dict__`` on each slotted
# dataclass first and swallows the AttributeError, which cost ~5 µs per MSG header on
# the event loop against ~1 µs for this (compiled) code.
_dumps: Final = orjson.dumps


def envelope_doc(e: Envelope) -> dict[str, Any]:
    return {
        "sender": e.sender,
        "recipients": e.recipients,
        "received_at": e.received_at,
        "peer": e.peer,
        "helo": e.helo,
        "smtputf8": e.smtputf8,
        "body_8bit": e.body_8bit,
        "size": e.size,
        "is_dsn": e.is_dsn,
        "listener": e.listener,
        "auth_user": e.auth_user,
    }


def unit_doc(u: UnitState) -> dict[str, Any]:
    return {
        "domain": u.domain,
        "recipients": [
            {"address": r.address, "status": r.status.value, "code": r.code, "text": r.text}
            for r in u.recipients
        ],
        "status": u.status.value,
        "attempts": u.attempts,
        "next_attempt_at": u.next_attempt_at,
        "history": [{"at": a.at, "mx": a.mx, "code": a.code, "text": a.text} for a in u.history],
        "delay_warned": u.delay_warned,
        "last_error": u.last_error,
        "finished_at": u.finished_at,
        "reopened_at": u.reopened_at,
        "released_at": u.released_at,
    }


def msg_payload(
    msg_id: str,
    envelope: Envelope,
    units: tuple[UnitState, ...],
    *,
    body_bytes: int,
    spilled: bool,
    inline_body: bytes = b"",
) -> tuple[bytes, int]:
    """(payload, offset of the inline body inside the payload)."""
    header = _dumps(
        {
            "envelope": envelope_doc(envelope),
            "units": [unit_doc(u) for u in units],
            "body": {"bytes": body_bytes, "spilled": spilled},
        }
    )
    prefix = msg_id.encode("ascii") + _U32.pack(len(header)) + header
    return prefix + inline_body, len(prefix)


def state_payload(msg_id: str, units: tuple[UnitState, ...]) -> bytes:
    header = _dumps({"units": [unit_doc(u) for u in units]})
    return msg_id.encode("ascii") + _U32.pack(len(header)) + header


def del_payload(msg_id: str, more_ids: tuple[str, ...] = ()) -> bytes:
    """A tombstone: ``msg_id`` with no JSON, then any ``more_ids`` (26 bytes each) that
    the same record forgets."""
    return msg_id.encode("ascii") + _U32.pack(0) + "".join(more_ids).encode("ascii")


def del_ids(payload: bytes | memoryview) -> list[str]:
    """Every message id a DEL payload forgets (the first, then the gathered ones; a
    trailing partial id is ignored)."""
    ids = [bytes(payload[:ID_BYTES]).decode("ascii", "replace")]
    end = len(payload) - (len(payload) - MSG_PREFIX_BYTES) % ID_BYTES
    for at in range(MSG_PREFIX_BYTES, end, ID_BYTES):
        ids.append(bytes(payload[at : at + ID_BYTES]).decode("ascii", "replace"))
    return ids


def segment_payload(seq: int, prev_end: int | None, created_at: float) -> bytes:
    return _dumps({"seq": seq, "prev_end": prev_end, "created_at": created_at})


def loads(data: bytes | memoryview) -> Any:
    """Decode a record's JSON; malformed input raises ``ValueError`` (as json.loads does)."""
    return orjson.loads(data)


# Recovery decodes every live message once; the model's validating from_json
# costs ~2x these direct constructions.  Records passed their CRC and were
# written by to_json, so the direct path is used first and the validating one
# only when the shape differs (e.g. a record from an older model version).


# Strings a queue repeats (senders, recipients, domains, HELO names, peers, listeners)
# are interned as they are decoded: a message's recipients then share one str with
# its units', and a large queue holds each distinct value once (issue 7: RSS per unit).


def envelope_from_json(data: dict[str, Any]) -> Envelope:
    try:
        fields = dict(data)
        fields["recipients"] = tuple([_intern(r) for r in fields["recipients"]])
        for key in ("sender", "peer", "helo", "listener", "auth_user"):
            value = fields.get(key)
            if type(value) is str:
                fields[key] = _intern(value)
        return Envelope(**fields)
    except (TypeError, KeyError):
        return Envelope.from_json(data)


_intern: Final = sys.intern
_RCPT_STATUS: Final = {s.value: s for s in RcptStatus}
_UNIT_STATUS: Final = {s.value: s for s in UnitStatus}


def units_from_json(data: list[dict[str, Any]]) -> tuple[UnitState, ...]:
    rcpt_status = _RCPT_STATUS
    try:
        out = []
        for unit in data:
            fields = dict(unit)
            fields["recipients"] = tuple(
                [
                    RecipientState(
                        _intern(r["address"]), rcpt_status[r["status"]], r["code"], r["text"]
                    )
                    for r in fields["recipients"]
                ]
            )
            fields["status"] = _UNIT_STATUS[fields["status"]]
            fields["domain"] = _intern(fields["domain"])
            for key in ("next_attempt_at", "finished_at", "reopened_at", "released_at"):
                if fields.get(key) == 0:
                    fields[key] = 0.0  # one shared constant instead of a float per unit
            history = fields["history"]
            fields["history"] = tuple([Attempt(**a) for a in history]) if history else ()
            out.append(UnitState(**fields))
        return tuple(out)
    except (TypeError, KeyError):
        return tuple(UnitState.from_json(u) for u in data)

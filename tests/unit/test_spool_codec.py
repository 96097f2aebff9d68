"""The spool's record JSON: orjson's direct dataclass output must be the document the
model's to_json() describes, and decoding must give the same objects back."""

from __future__ import annotations

import dataclasses
import json

from hypothesis import given
from hypothesis import strategies as st

from empath.spool import codec
from empath.spool.model import (
    Attempt,
    Envelope,
    RcptStatus,
    RecipientState,
    UnitState,
    UnitStatus,
)

texts = st.text(max_size=20)  # any Unicode, quotes, control characters
floats = st.floats(min_value=0, max_value=4e9, allow_nan=False)
codes = st.none() | st.integers(min_value=200, max_value=599)

envelopes = st.builds(
    Envelope,
    sender=texts,
    recipients=st.lists(texts, max_size=3).map(tuple),
    received_at=floats,
    peer=texts,
    helo=texts,
    smtputf8=st.booleans(),
    body_8bit=st.booleans(),
    size=st.integers(min_value=0, max_value=2**40),
    is_dsn=st.booleans(),
    listener=texts,
    auth_user=st.none() | texts,
)
recipients = st.builds(RecipientState, texts, st.sampled_from(RcptStatus), codes, texts)
attempts = st.builds(Attempt, floats, texts, codes, texts)
units = st.builds(
    UnitState,
    domain=texts,
    recipients=st.lists(recipients, min_size=1, max_size=3).map(tuple),
    status=st.sampled_from(UnitStatus),
    attempts=st.integers(min_value=0, max_value=1000),
    next_attempt_at=floats,
    history=st.lists(attempts, max_size=3).map(tuple),
    delay_warned=st.booleans(),
    last_error=texts,
    finished_at=floats,
)
MSG_ID = "01JD0000000000000000000000"


def _same_document(header: bytes, expected: object) -> bool:
    """Equal as JSON (orjson spells some floats differently: 1e-06 vs 1e-6)."""
    return bool(json.loads(header) == json.loads(json.dumps(expected)))


@given(envelopes, st.lists(units, min_size=1, max_size=3).map(tuple), st.booleans())
def test_msg_payload_is_the_to_json_document(
    env: Envelope, us: tuple[UnitState, ...], spilled: bool
) -> None:
    payload, body_rel = codec.msg_payload(
        MSG_ID, env, us, body_bytes=7, spilled=spilled, inline_body=b"body\r\n."
    )
    header = payload[codec.MSG_PREFIX_BYTES : body_rel]
    expected = {
        "envelope": env.to_json(),
        "units": [u.to_json() for u in us],
        "body": {"bytes": 7, "spilled": spilled},
    }
    assert _same_document(header, expected)
    assert payload[body_rel:] == b"body\r\n."
    decoded = codec.loads(header)
    assert codec.envelope_from_json(decoded["envelope"]) == env
    assert codec.units_from_json(decoded["units"]) == us


@given(st.lists(units, min_size=1, max_size=3).map(tuple))
def test_state_payload_is_the_to_json_document(us: tuple[UnitState, ...]) -> None:
    payload = codec.state_payload(MSG_ID, us)
    assert payload[: codec.ID_BYTES] == MSG_ID.encode()
    header = payload[codec.MSG_PREFIX_BYTES :]
    assert _same_document(header, {"units": [u.to_json() for u in us]})
    assert codec.units_from_json(codec.loads(header)["units"]) == us


def test_the_record_documents_name_every_field_of_the_model_in_declaration_order() -> None:
    """codec builds the MSG/STATE documents field by field (cheaper than orjson on the
    dataclasses): a field added to the model and not to the codec would be lost."""
    env = Envelope(sender="a@b", recipients=("c@d",), received_at=1.0)
    unit = UnitState(
        domain="d",
        recipients=(RecipientState("c@d"),),
        history=(Attempt(at=1.0, mx="mx", code=250, text="ok"),),
    )
    assert list(codec.envelope_doc(env)) == [f.name for f in dataclasses.fields(Envelope)]
    doc = codec.unit_doc(unit)
    assert list(doc) == [f.name for f in dataclasses.fields(UnitState)]
    assert list(doc["recipients"][0]) == [f.name for f in dataclasses.fields(RecipientState)]
    assert list(doc["history"][0]) == [f.name for f in dataclasses.fields(Attempt)]


_IDS = st.lists(st.text("0123456789ABCDEFGHJKMNPQRSTVWXYZ", min_size=26, max_size=26), min_size=1)


@given(_IDS)
def test_a_gathered_tombstone_names_every_id_and_starts_like_a_single_one(ids: list[str]) -> None:
    """The first id and a zero JSON length come first, as in a one-message tombstone, so a
    reader that knows only those forgets the first message and keeps the others (they
    would be delivered again, never lost)."""
    payload = codec.del_payload(ids[0], tuple(ids[1:]))
    assert ids == codec.del_ids(payload)
    assert codec.del_payload(ids[0]) == payload[: codec.MSG_PREFIX_BYTES]
    assert codec.del_ids(payload + b"0123") == ids  # a partial trailing id is ignored

"""Issue 14, defect 9: `audit.redact_*` also hides the addresses inside free text."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from empath import logs
from empath.logs import RECIPIENT_FIELDS, get_logger, redact_text

Records = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def records(tmp_path: Path) -> Iterator[Records]:
    """The daemon's log sink (recipients redacted) writing to a file; its records."""
    path = tmp_path / "log"
    with path.open("w") as stream:
        logs.setup_logging("debug", "json", stream=stream, redacted=RECIPIENT_FIELDS)

        def read() -> list[dict[str, Any]]:
            logs.flush()
            return [json.loads(line) for line in path.read_text().splitlines()]

        try:
            yield read
        finally:
            logs._sink = None


@pytest.mark.parametrize(
    ("expected", "text"),
    [
        ("550 5.1.1 <[REDACTED]@p.test>: unknown", "550 5.1.1 <secret.user@p.test>: unknown"),
        ("550 <[REDACTED]@p.test> no", '550 <"a b"@p.test> no'),
        ("no address here", "no address here"),
        ("a [REDACTED]@x.test, b [REDACTED]@y.test", "a u1@x.test, b u2@y.test"),
    ],
)
def test_addresses_in_free_text_lose_their_local_part(expected: str, text: str) -> None:
    assert expected == redact_text(text)


def test_a_redacted_value_is_hidden_wherever_it_appears() -> None:
    assert "550 [REDACTED]... User unknown" == redact_text(
        "550 secret.user... User unknown", ["secret.user@p.test", "secret.user"]
    )


def test_the_remote_reply_beside_a_redacted_recipient_is_redacted_too(records: Records) -> None:
    """The recipient field and every free text of the record lose the local part; the
    sender stays (only recipients are redacted here); our own message text is intact."""
    log = get_logger("delivery", "empath.test")
    log.error(
        "Delivery failed permanently",
        recipient="secret.user@p.test",
        sender="ops@origin.test",
        domain="p.test",
        error="550 5.1.1 <secret.user@p.test>: no; also secret.user... unknown",
        history=["451 <secret.user@p.test> later"],
    )
    log.warn("Delivery deferred", domain="p.test", error="451 4.2.0 <other.user@p.test> busy")
    (failed, deferred) = records()
    fields = failed["fields"]
    assert "[REDACTED]@p.test" == fields["recipient"]
    assert "ops@origin.test" == fields["sender"]
    assert "550 5.1.1 <[REDACTED]@p.test>: no; also [REDACTED]... unknown" == fields["error"]
    assert ["451 <[REDACTED]@p.test> later"] == fields["history"]
    assert "Delivery failed permanently" == fields["message"]
    assert "451 4.2.0 <[REDACTED]@p.test> busy" == deferred["fields"]["error"]
    assert "secret.user" not in json.dumps([failed, deferred])

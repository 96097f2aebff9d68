"""The LogQL subset evaluator used to check the runbook's queries against real log lines."""

from __future__ import annotations

import json

import pytest

from tests.logql import LogQLError, parse, run

STREAM = {"service": "empath"}


def line(level: str, **fields: object) -> str:
    return json.dumps({"timestamp": "t", "level": level, "target": "x", "fields": fields})


ERR_DELIVERY = line("ERROR", message="Delivery failed permanently", component="delivery",
                    domain="hard.test", smtp_code="550", message_id="M1")  # fmt: skip
WARN_DEFER = line("WARN", message="Delivery deferred", component="delivery", domain="soft.test",
                  smtp_code="451", message_id="M2")  # fmt: skip
ERR_BREAKER = line("ERROR", message="Circuit breaker OPENED for dead.test", component="delivery",
                   domain="dead.test")  # fmt: skip
INFO_RL = line("INFO", message="Rate limit exceeded, delivery deferred", component="delivery",
               domain="slow.test", message_id="M3")  # fmt: skip
ERR_SMTP = line("ERROR", message="Session crashed", component="smtp")
LINES = [ERR_DELIVERY, WARN_DEFER, ERR_BREAKER, INFO_RL, ERR_SMTP, "not json"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ('{service="empath"} | json | level="ERROR"', [ERR_DELIVERY, ERR_BREAKER, ERR_SMTP]),
        ('{service="empath"} | json | level="ERROR" | fields.component="delivery"',
         [ERR_DELIVERY, ERR_BREAKER]),
        ('{service="empath"} | json | level="ERROR" | fields_component="delivery"',
         [ERR_DELIVERY, ERR_BREAKER]),
        ('{service="empath"} | json | level="ERROR" | fields.domain!=""',
         [ERR_DELIVERY, ERR_BREAKER]),
        ('{service="empath"} | json | fields.smtp_code=~"5.."', [ERR_DELIVERY]),
        ('{service="empath"} | json | fields.smtp_code=~"5"', []),  # anchored
        ('{service="empath"} | json | fields.smtp_code!~"5.."',
         [WARN_DEFER, ERR_BREAKER, INFO_RL, ERR_SMTP, "not json"]),
        ('{service="empath"} | json | fields.message=~"Circuit breaker.*"', [ERR_BREAKER]),
        ('{service="empath"} | json | fields.message_id="M2"', [WARN_DEFER]),
        ('{service="empath"} |= "Rate limit exceeded"', [INFO_RL]),
        ('{service="empath"} != "Delivery"', [ERR_BREAKER, INFO_RL, ERR_SMTP, "not json"]),
        ('{service="empath"} |~ "OPENED|crashed"', [ERR_BREAKER, ERR_SMTP]),
        ('{service="other"} | json', []),
        ('{service=~"emp.*"} | json | fields.domain="dead.test" | level="ERROR"', [ERR_BREAKER]),
    ],
)  # fmt: skip
def test_queries_select_the_expected_lines(query: str, expected: list[str]) -> None:
    assert expected == run(query, LINES, STREAM)


@pytest.mark.parametrize("bad", ['service="empath"', '{service="empath"} | sum', "{x=}"])
def test_unsupported_queries_are_errors(bad: str) -> None:
    with pytest.raises(LogQLError):
        parse(bad)

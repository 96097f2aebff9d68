"""Passwords in config URLs are redacted wherever the config is shown (issue 14, defect 10)."""

from __future__ import annotations

import pytest

from empath.config.load import loads_config, render_config
from empath.config.model import ClusterConfig, Config, MetricsConfig
from empath.config.reload import config_changes
from empath.textsafe import redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:6379/0", "redis://:REDACTED@h:6379/0"),
        ("redis://user:pw@h/0", "redis://user:REDACTED@h/0"),
        ("rediss://pw@h", "rediss://REDACTED@h"),
        ("redis://h:6379/0?password=pw&db=1", "redis://h:6379/0?password=REDACTED&db=1"),
        ("unix://:p%40w@/run/redis.sock?db=0", "unix://:REDACTED@/run/redis.sock?db=0"),
        ("https://u:pw@otlp.example/v1/metrics", "https://u:REDACTED@otlp.example/v1/metrics"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:pa/ss@w@h/0", "redis://:REDACTED@h/0"),
        ("https://otlp.example/v1?a=b", "https://otlp.example/v1?a=b"),
    ],
)
def test_redact_url_hides_the_password_and_keeps_where_it_points(url: str, shown: str) -> None:
    assert shown == redact_url(url)


def test_the_effective_config_never_prints_the_redis_password() -> None:
    config = Config(
        cluster=ClusterConfig(redis_url="redis://:hunter2@redis.internal:6379/0", node_id="n"),
        metrics=MetricsConfig(endpoint="https://u:otlp-pw@collector/v1/metrics"),
    )
    text = render_config(config)
    assert "hunter2" not in text and "otlp-pw" not in text
    reloaded = loads_config(text)
    assert "redis://:REDACTED@redis.internal:6379/0" == reloaded.cluster.redis_url  # type: ignore[union-attr]


def test_a_changed_password_is_a_change_shown_without_the_password() -> None:
    old = Config(cluster=ClusterConfig(redis_url="redis://:one@r/0", node_id="n"))
    new = Config(cluster=ClusterConfig(redis_url="redis://:two@r/0", node_id="n"))
    changes, restart = config_changes(old, new)
    assert ["cluster.redis_url"] == restart
    (line,) = changes
    assert "one" not in line and "two" not in line
    assert "(password changed)" in line

"""Admission to a listener (DESIGN §3): both caps, IPv6 by /64, release, and the
bookkeeping invariants over any sequence of connections coming and going."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from empath.transport.admission import Admission, per_ip_key


def test_one_client_gets_its_share_and_others_the_rest() -> None:
    a = Admission(max_connections=3, max_per_ip=2)
    assert [True, True, False] == [a.admit("192.0.2.1") for _ in range(3)]
    assert a.admit("192.0.2.2")
    assert not a.admit("192.0.2.3")  # the listener is full
    assert 3 == a.active
    assert {"192.0.2.1": 2, "192.0.2.2": 1} == dict(a.per_key)


def test_a_release_frees_the_slot_and_forgets_an_idle_client() -> None:
    a = Admission(max_connections=10, max_per_ip=1)
    assert a.admit("192.0.2.1")
    assert not a.admit("192.0.2.1")
    a.release("192.0.2.1")
    assert {} == dict(a.per_key)
    assert 0 == a.active
    assert a.admit("192.0.2.1")


def test_ipv6_clients_of_one_64_share_a_cap() -> None:
    a = Admission(max_connections=10, max_per_ip=2)
    assert a.admit("2001:db8:1:2::1")
    assert a.admit("2001:db8:1:2:ffff::9")
    assert not a.admit("2001:db8:1:2::77")
    assert a.admit("2001:db8:1:3::1")  # another /64
    assert {"2001:db8:1:2::/64": 2, "2001:db8:1:3::/64": 1} == dict(a.per_key)
    assert "2001:db8:1:2::/64" == per_ip_key("2001:db8:1:2::1%eth0")
    assert "not an address" == per_ip_key("not an address")


IPS = st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2", "2001:db8:0:1::1"])


@given(st.lists(st.tuples(st.booleans(), IPS), max_size=60), st.integers(1, 5), st.integers(1, 3))
def test_the_counts_always_match_the_sessions_admitted(
    steps: list[tuple[bool, str]], max_connections: int, max_per_ip: int
) -> None:
    a = Admission(max_connections, max_per_ip)
    open_: list[str] = []
    for opening, ip in steps:
        if opening:
            room = (
                len(open_) < max_connections
                and sum(per_ip_key(o) == per_ip_key(ip) for o in open_) < max_per_ip
            )
            assert room == a.admit(ip)
            if room:
                open_.append(ip)
        elif ip in open_:
            open_.remove(ip)
            a.release(ip)
        assert len(open_) == a.active == sum(a.per_key.values())
        assert all(0 < n <= max_per_ip for n in a.per_key.values())

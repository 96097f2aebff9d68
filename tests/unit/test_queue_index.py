"""DueIndex: due-time ordered unit keys with lazy deletion."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from empath.queue.index import DueIndex, UnitKey


def k(i: int, domain: str = "a.com") -> UnitKey:
    return UnitKey(f"m{i}", domain)


def test_pops_due_keys_earliest_first_up_to_limit() -> None:
    index: DueIndex[UnitKey] = DueIndex()
    index.schedule(k(1), 30.0)
    index.schedule(k(2), 10.0)
    index.schedule(k(3), 20.0)
    index.schedule(k(4), 99.0)
    assert [k(2), k(3)] == index.pop_due(50.0, 2)
    assert [k(1)] == index.pop_due(50.0, 10)
    assert [] == index.pop_due(50.0, 10)
    assert 99.0 == index.next_due()
    assert 1 == len(index)


def test_equal_due_times_pop_in_scheduling_order() -> None:
    index: DueIndex[UnitKey] = DueIndex()
    for i in range(5):
        index.schedule(k(i), 1.0)
    assert [k(i) for i in range(5)] == index.pop_due(1.0, 10)


def test_reschedule_replaces_the_old_due_time() -> None:
    index: DueIndex[UnitKey] = DueIndex()
    index.schedule(k(1), 10.0)
    index.schedule(k(1), 100.0)
    assert [] == index.pop_due(50.0, 10)
    assert 100.0 == index.due_at(k(1))
    assert [k(1)] == index.pop_due(100.0, 10)
    assert k(1) not in index


def test_remove_and_contains() -> None:
    index: DueIndex[UnitKey] = DueIndex()
    index.schedule(k(1), 1.0)
    assert k(1) in index
    assert index.remove(k(1))
    assert not index.remove(k(1))
    assert k(1) not in index
    assert index.next_due() is None
    assert index.pop_one(1e18) is None
    assert not index


def test_make_all_due_moves_future_keys_to_now_keeping_their_order() -> None:
    index: DueIndex[UnitKey] = DueIndex()
    index.schedule(k(1), 500.0)
    index.schedule(k(2), 5.0)
    index.schedule(k(3), 300.0)
    assert 2 == index.make_all_due(100.0)
    assert 5.0 == index.next_due()
    assert [k(2), k(3), k(1)] == index.pop_due(100.0, 10)


def test_heap_is_compacted_when_stale_entries_pile_up() -> None:
    index: DueIndex[UnitKey] = DueIndex()
    for _ in range(50):
        for i in range(100):
            index.schedule(k(i), float(i))
    assert 100 == len(index)
    assert len(index._heap) <= 2 * 1024 + 200  # bounded, not 5000
    assert [k(i) for i in range(100)] == index.pop_due(1e9, 1000)


def test_string_keys_work_too() -> None:
    timers: DueIndex[str] = DueIndex()
    timers.schedule("b.org", 2.0)
    timers.schedule("a.org", 1.0)
    assert "a.org" == timers.pop_one(5.0)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("schedule"), st.integers(0, 15), st.floats(0.0, 100.0)),
        st.tuples(st.just("remove"), st.integers(0, 15), st.just(0.0)),
        st.tuples(st.just("pop"), st.integers(1, 5), st.floats(0.0, 100.0)),
        st.tuples(st.just("all_due"), st.just(0), st.floats(0.0, 100.0)),
    ),
    max_size=150,
)


@given(OPS)
def test_property_pops_in_due_order_and_never_loses_or_duplicates_keys(
    ops: list[tuple[str, int, float]],
) -> None:
    index: DueIndex[UnitKey] = DueIndex()
    model: dict[UnitKey, float] = {}
    for op, n, t in ops:
        if op == "schedule":
            index.schedule(k(n), t)
            model[k(n)] = t
        elif op == "remove":
            assert (k(n) in model) == index.remove(k(n))
            model.pop(k(n), None)
        elif op == "all_due":
            index.make_all_due(t)
            model = {key: min(due, t) for key, due in model.items()}
        else:
            popped = index.pop_due(t, n)
            dues = [model.pop(key) for key in popped]  # KeyError = lost/duplicated key
            assert sorted(dues) == dues
            assert all(d <= t for d in dues)
            remaining_due = sorted(d for d in model.values() if d <= t)
            if len(popped) < n:
                assert [] == remaining_due  # everything due was returned
            elif dues and remaining_due:
                assert dues[-1] <= remaining_due[0]  # earliest were taken first
        assert len(model) == len(index)
        assert set(model) == {key for key in model if key in index}
        expected_next = min(model.values()) if model else None
        assert expected_next == index.next_due()
    assert sorted(model.values()) == [model[key] for key in index.pop_due(1e9, 10_000)]

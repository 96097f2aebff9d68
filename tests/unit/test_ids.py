"""ULID message ids."""

from empath import ids


def test_ids_are_26_char_ulids_strictly_increasing_within_a_process() -> None:
    made = [ids.new_ulid() for _ in range(5000)]
    assert sorted(made) == made
    assert 5000 == len(set(made))
    assert all(ids.is_ulid(m) for m in made)


def test_timestamp_round_trips_through_the_first_ten_chars() -> None:
    factory = ids._UlidFactory()
    ulid = factory.new(now_ms=1_700_000_000_123)
    assert 1_700_000_000_123 == ids.timestamp_ms(ulid)


def test_same_millisecond_ids_still_increase() -> None:
    factory = ids._UlidFactory()
    first = factory.new(now_ms=5)
    second = factory.new(now_ms=5)
    earlier_clock = factory.new(now_ms=4)  # a clock step back never reorders ids
    assert first < second < earlier_clock


def test_is_ulid_rejects_wrong_length_and_alphabet() -> None:
    assert not ids.is_ulid("")
    assert not ids.is_ulid("01M8G4W45K3F1MHKAT4XTWBSWI")  # I is not Crockford base32
    assert not ids.is_ulid("01M8G4W45K3F1MHKAT4XTWBSW")

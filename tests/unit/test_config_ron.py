"""The RON reader and writer: every grammar feature, every error with its position,
and hypothesis properties (round trips; junk only ever raises ConfigError)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from empath.config.ron import (
    MapValue,
    RonBool,
    RonIdent,
    RonList,
    RonMap,
    RonNone,
    RonNumber,
    RonSome,
    RonStr,
    RonStruct,
    RonTuple,
    RonUnit,
    dumps,
    is_identifier,
    parse,
    to_python,
)
from empath.errors import ConfigError

DEV_CONFIG = Path(__file__).resolve().parents[2] / "empath.config.ron"


def value_of(text: str) -> Any:
    return to_python(parse(text))


# --- grammar: text -> plain value ---------------------------------------------

VALID_CASES: list[tuple[str, Any]] = [
    # integers
    ("0", 0),
    ("42", 42),
    ("-7", -7),
    ("+7", 7),
    ("1_000_000", 1_000_000),
    ("0x1F", 31),
    ("0xff", 255),
    ("-0x10", -16),
    ("0o17", 15),
    ("0b1010", 10),
    ("0x_ff_ff", 65535),
    # floats
    ("1.0", 1.0),
    ("1e3", 1000.0),
    ("1E3", 1000.0),
    ("-0.5", -0.5),
    (".5", 0.5),
    ("1.", 1.0),
    ("2.5e-3", 0.0025),
    ("1_0.2_5", 10.25),
    ("1e+2", 100.0),
    ("inf", math.inf),
    ("-inf", -math.inf),
    ("+inf", math.inf),
    # booleans, options, unit
    ("true", True),
    ("false", False),
    ("None", None),
    ("Some(3)", 3),
    ("Some( [1] ,)", [1]),
    ("()", None),
    # strings
    ('""', ""),
    ('"plain"', "plain"),
    (r'"a\nb\tc"', "a\nb\tc"),
    (r'"q\"q"', 'q"q'),
    (r'"back\\slash"', "back\\slash"),
    (r'"\r\0\/\b\f\'"', "\r\0/\b\f'"),
    (r'"\u{1F600}"', "\U0001f600"),
    (r'"\u{41}"', "A"),
    (r'"\u00e9"', "é"),
    (r'"\x41"', "A"),
    ('"multi\nline"', "multi\nline"),
    ('"cont\\\n     inued"', "continued"),
    ('"ünïcödé ✓"', "ünïcödé ✓"),
    ('r"raw \\n"', "raw \\n"),
    ('r#"has "quotes""#', 'has "quotes"'),
    ('r##"a "# b"##', 'a "# b'),
    ("'c'", "c"),
    (r"'\n'", "\n"),
    # lists and tuples
    ("[]", []),
    ("[1, 2, 3]", [1, 2, 3]),
    ("[1, 2, 3,]", [1, 2, 3]),
    ("[[1], [], [[2]]]", [[1], [], [[2]]]),
    ('(1, "a")', [1, "a"]),
    ("(1,)", [1]),
    ("Point(1, 2)", [1, 2]),
    # structs
    ("(a: 1)", {"a": 1}),
    ("(a: 1, b: (c: true),)", {"a": 1, "b": {"c": True}}),
    ('Empath ( hostname: "x" )', {"hostname": "x"}),
    ("Empath()", {}),
    ("( r: 1 )", {"r": 1}),
    ("( true: 1 )", {"true": 1}),
    ("(type: File)", {"type": "File"}),
    # maps
    ("{}", {}),
    ('{ "k": 1 }', {"k": 1}),
    ('{ "k": 1, }', {"k": 1}),
    ("{ bare: 1, other_key: 2 }", {"bare": 1, "other_key": 2}),
    ('{ "gmail.com": ( rate_limit: 100 ) }', {"gmail.com": {"rate_limit": 100}}),
    ('{ 1: "one", false: "no", -2.5: 0 }', {1: "one", False: "no", -2.5: 0}),
    # comments and whitespace
    ("// lead\n1 // trail", 1),
    ("/* a */ 1 /* b */", 1),
    ("/* outer /* inner */ still outer */ 1", 1),
    ("[1, // one\n 2 /* two */, ]", [1, 2]),
    ("\ufeff\r\n\t 5 \r\n", 5),
    ("#![enable(implicit_some)]\n(a: 1)", {"a": 1}),
    ('"// not a comment"', "// not a comment"),
]


@pytest.mark.parametrize(("text", "expected"), VALID_CASES)
def test_reader_reads_each_grammar_feature(text: str, expected: Any) -> None:
    """Every grammar feature parses to the expected plain value."""
    assert expected == value_of(text)


def test_integers_and_floats_stay_distinct() -> None:
    """1 is an int and 1.0 a float, so the schema can refuse floats for counts."""
    assert isinstance(value_of("1"), int)
    assert isinstance(value_of("1.0"), float)
    assert isinstance(value_of("1e3"), float)


def test_nan_reads_as_nan() -> None:
    """NaN is accepted as a float literal."""
    assert math.isnan(value_of("NaN"))


# --- node kinds and positions --------------------------------------------------


def test_nodes_carry_line_and_column() -> None:
    """Every node records where it starts (1-based line and column)."""
    text = 'Empath (\n  hostname: "mx",\n  list: [ 1, Some(2.5) ],\n  m: { "k": None },\n)\n'
    root = parse(text)
    assert isinstance(root, RonStruct)
    assert ("Empath", 1, 1) == (root.name, root.line, root.column)
    host = root.fields["hostname"]
    assert (2, 3) == (host.line, host.column)
    assert RonStr(value="mx", line=2, column=13) == host.value
    lst = root.fields["list"].value
    assert isinstance(lst, RonList)
    assert (3, 9) == (lst.line, lst.column)
    assert RonNumber(value=1, line=3, column=11) == lst.items[0]
    some = lst.items[1]
    assert isinstance(some, RonSome)
    assert RonNumber(value=2.5, line=3, column=19) == some.value
    m = root.fields["m"].value
    assert isinstance(m, RonMap)
    entry = m.entries[0]
    assert (RonStr(value="k", line=4, column=8), 4, 8) == (entry.key, entry.line, entry.column)
    assert RonNone(line=4, column=13) == entry.value


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("()", RonUnit),
        ("(1, 2)", RonTuple),
        ("(a: 1)", RonStruct),
        ("[1]", RonList),
        ("{}", RonMap),
        ("File", RonIdent),
        ("true", RonBool),
        ("None", RonNone),
        ("Some(1)", RonSome),
        ('"s"', RonStr),
        ('r"s"', RonStr),
        ("1", RonNumber),
    ],
)
def test_reader_builds_node_kind(text: str, kind: type) -> None:
    """Each construct becomes its own node type."""
    assert kind is type(parse(text))


def test_struct_fields_keep_written_order() -> None:
    """Struct fields are kept in the order they were written."""
    root = parse("(z: 1, a: 2, m: 3)")
    assert isinstance(root, RonStruct)
    assert ["z", "a", "m"] == list(root.fields)


def test_bare_map_key_is_a_string() -> None:
    """A bare word used as a map key is read as a string key."""
    root = parse("{ service: 1 }")
    assert isinstance(root, RonMap)
    assert "service" == root.entries[0].key.value


# --- errors with positions -------------------------------------------------------

ERROR_CASES: list[tuple[str, int, int, str]] = [
    ("", 1, 1, "empty document"),
    ("   // only a comment\n", 2, 1, "empty document"),
    ("(a: 1", 1, 6, "expected ',' or ')'"),
    ("(a 1)", 1, 4, "expected ',' or ')'"),
    ("(a: )", 1, 5, "expected a value"),
    ("(a: 1 b: 2)", 1, 7, "expected ',' or ')'"),
    ("(a: 1, 2)", 1, 8, "expected a field name"),
    ("(a: 1, a: 2)", 1, 8, "duplicate field 'a'"),
    ("[1 2]", 1, 4, "expected ',' or ']'"),
    ("[1,\n  2,\n  3", 3, 4, "unexpected end of input"),
    ("[,]", 1, 2, "expected a value"),
    ("{ k 1 }", 1, 5, "expected ':' after a map key"),
    ('{ "k": 1 "j": 2 }', 1, 10, "expected ',' or '}'"),
    ('{ "k": 1, "k": 2 }', 1, 11, "duplicate map key 'k'"),
    ("{ [1]: 2 }", 1, 3, "map keys must be strings, numbers or booleans"),
    ('"abc', 1, 1, "unterminated string"),
    ('(a: "x\n  y', 1, 5, "unterminated string"),
    ('"bad \\q escape"', 1, 6, "invalid escape \\q"),
    ('"\\u{}"', 1, 2, "\\u escape"),
    ('"\\u{110000}"', 1, 2, "beyond U+10FFFF"),
    ('"\\uZZZZ"', 1, 2, "\\u escape"),
    ('"\\x4"', 1, 2, "\\x escape needs two hex digits"),
    ('"\\', 1, 2, "unterminated escape"),
    ('r#"never closed"', 1, 1, "unterminated raw string"),
    ("r#x", 1, 1, "raw string needs"),
    ("''", 1, 1, "empty or unterminated char literal"),
    ("'ab'", 1, 1, "exactly one character"),
    ("0x", 1, 1, "no digits after the radix prefix"),
    ("0b102", 1, 1, "invalid number"),
    ("12abc", 1, 1, "invalid number"),
    ("1.2.3", 1, 1, "invalid number"),
    ("1e", 1, 1, "invalid number"),
    ("-", 1, 1, "invalid number"),
    ("+.", 1, 1, "invalid number"),
    ("Some 1", 1, 6, "expected '(' after Some"),
    ("Some(1", 1, 7, "expected ')' closing Some"),
    ("/* never closed", 1, 1, "unterminated block comment"),
    ("/* a /* b */", 1, 1, "unterminated block comment"),
    ("1 2", 1, 3, "after the end of the document"),
    ("(a: 1))", 1, 7, "after the end of the document"),
    ("\n\n   @", 3, 4, "unexpected '@', expected a value"),
    ("#![oops", 1, 1, "malformed #![...] attribute"),
    ("[" * 150, 1, 101, "nested deeper than"),
]


@pytest.mark.parametrize(("text", "line", "column", "message"), ERROR_CASES)
def test_reader_reports_error_position(text: str, line: int, column: int, message: str) -> None:
    """Each syntax error raises ConfigError naming file:line:column."""
    with pytest.raises(ConfigError) as info:
        parse(text, file="test.ron")
    err = info.value
    assert (line, column) == (err.line, err.column), str(err)
    assert message in err.detail
    assert str(err).startswith(f"test.ron:{line}:{column}: ")


# --- writer -------------------------------------------------------------------------


def test_dumps_writes_identifier_dicts_as_structs_and_others_as_maps() -> None:
    """dicts with identifier keys become structs; other dicts and MapValue become maps."""
    assert '(a: 1, b: "x")\n' == dumps({"a": 1, "b": "x"})
    assert '{"gmail.com": 1}\n' == dumps({"gmail.com": 1})
    assert '{"a": 1}\n' == dumps(MapValue({"a": 1}))
    assert "{}\n" == dumps({})
    assert "{1: true}\n" == dumps({1: True})


def test_dumps_names_the_top_struct_and_breaks_long_lines() -> None:
    """A named top-level struct is written as ``Name ( ... )``, long ones one field per line."""
    text = dumps({"hostname": "h" * 80, "n": [1, 2]}, name="Empath")
    assert text.startswith("Empath (\n    hostname: ")
    assert "    n: [1, 2],\n)" in text
    assert {"hostname": "h" * 80, "n": [1, 2]} == value_of(text)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "None"),
        (True, "true"),
        (False, "false"),
        (-3, "-3"),
        (1.0, "1.0"),
        (1e20, "1e+20"),
        (math.inf, "inf"),
        (-math.inf, "-inf"),
        ('q"\\\n\t', r'"q\"\\\n\t"'),
        ("\x01é", '"\\u{1}é"'),
        ((1, 2), "[1, 2]"),
    ],
)
def test_dumps_scalar_spelling(value: Any, text: str) -> None:
    """Scalars are written in RON's spelling."""
    assert text + "\n" == dumps(value)


def test_dumps_refuses_unsupported_values() -> None:
    """Objects RON cannot express are a programming error (TypeError), not ConfigError."""
    with pytest.raises(TypeError):
        dumps({"a": object()})
    with pytest.raises(TypeError):
        dumps([1], name="Empath")


def test_is_identifier() -> None:
    """Only ASCII identifiers can be written bare."""
    assert is_identifier("max_attempts")
    assert not is_identifier("gmail.com")
    assert not is_identifier("1abc")
    assert not is_identifier(3)


def test_dev_config_parses() -> None:
    """The repository's commented dev config is valid RON."""
    root = parse(DEV_CONFIG.read_text(encoding="utf-8"))
    assert isinstance(root, RonStruct)
    assert "Empath" == root.name


# --- properties -----------------------------------------------------------------------

_keys = st.one_of(
    st.text("aZ_09", min_size=1, max_size=12).filter(is_identifier),
    st.text(max_size=12),
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False),
    st.text(max_size=30),
)
_values = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(_keys, children, max_size=5),
    ),
    max_leaves=30,
)


def _normalise(value: Any) -> Any:
    """What a value reads back as: tuples become lists, -0.0 stays a float."""
    if isinstance(value, tuple | list):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    return value


@given(_values)
def test_dumps_then_parse_round_trips(value: Any) -> None:
    """Any plain value written by dumps reads back equal (types included)."""
    text = dumps(value)
    back = to_python(parse(text))
    assert _normalise(value) == back
    assert repr(_normalise(value)) == repr(back)  # int vs float, -0.0 vs 0.0


@given(
    st.dictionaries(
        st.text("abz_019", min_size=1, max_size=8).filter(is_identifier), _values, max_size=4
    )
)
def test_named_struct_round_trips(value: dict[str, Any]) -> None:
    """A named top-level struct round-trips (an empty one reads back as {})."""
    if not value:
        return
    assert value == to_python(parse(dumps(value, name="Empath")))


def _assert_position_inside(text: str, err: ConfigError) -> None:
    lines = text.split("\n")
    assert 1 <= err.line <= len(lines), (err.line, len(lines))
    assert 1 <= err.column <= len(lines[err.line - 1]) + 1, (err.column, lines[err.line - 1])


_GRAMMAR_ALPHABET = st.sampled_from(
    [*"()[]{}:,\"'\\/*#!rSomeNnTtfx0123456789.-+_eE \n\tuab{}", "Some(", "None", "//", "/*"]
)


@given(st.one_of(st.text(max_size=60), st.lists(_GRAMMAR_ALPHABET, max_size=40).map("".join)))
def test_junk_raises_only_config_error_with_position(text: str) -> None:
    """Random text either parses or raises ConfigError positioned inside the text."""
    try:
        parse(text)
    except ConfigError as err:
        _assert_position_inside(text, err)


@given(st.data())
def test_mutated_dev_config_raises_only_config_error(data: st.DataObject) -> None:
    """Deleting or inserting characters in a real config never raises anything else."""
    text = DEV_CONFIG.read_text(encoding="utf-8")
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(text)))
        if data.draw(st.booleans()):
            text = text[:at] + text[at + data.draw(st.integers(1, 5)) :]
        else:
            text = text[:at] + data.draw(_GRAMMAR_ALPHABET) + text[at:]
    try:
        parse(text)
    except ConfigError as err:
        _assert_position_inside(text, err)

"""A small LogQL evaluator for the subset the runbooks use (Loki is not packaged here).

Supported: a stream selector (``{service="empath"}``: label matchers against the
stream labels given), line filters ``|= "s"``, ``!= "s"``, ``|~ "re"``, ``!~ "re"``,
the ``| json`` parser, and label filters ``| name op "value"`` with ``=``, ``!=``,
``=~``, ``!~`` (regexes fully anchored, as Loki's label matchers are).

``| json`` flattens nested objects the way Loki does (``fields.component`` becomes
the label ``fields_component``); a filter may name either spelling — the operators'
runbook writes ``fields.component``, Loki itself wants ``fields_component``.  A
label the line lacks is the empty string, so ``fields_domain!=""`` keeps lines that
have a domain.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_SELECTOR = re.compile(r"^\{(?P<body>[^}]*)\}")
_MATCHER = re.compile(
    r'\s*(?P<name>[A-Za-z_][\w.]*)\s*(?P<op>=~|!~|!=|=)\s*"(?P<value>(?:[^"\\]|\\.)*)"\s*,?'
)
_LINE_FILTER = re.compile(r'^\s*(?P<op>\|=|!=|\|~|!~)\s*"(?P<value>(?:[^"\\]|\\.)*)"')
_JSON = re.compile(r"^\s*\|\s*json\b")
_LABEL_FILTER = re.compile(
    r'^\s*\|\s*(?P<name>[A-Za-z_][\w.]*)\s*(?P<op>=~|!~|!=|=)\s*"(?P<value>(?:[^"\\]|\\.)*)"'
)


class LogQLError(ValueError):
    pass


def _unquote(value: str) -> str:
    return str(json.loads(f'"{value}"'))


@dataclass(frozen=True, slots=True)
class Matcher:
    name: str
    op: str
    value: str

    def matches(self, actual: str) -> bool:
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        hit = re.fullmatch(self.value, actual) is not None
        return hit if self.op == "=~" else not hit


@dataclass(frozen=True, slots=True)
class LineFilter:
    op: str
    value: str

    def matches(self, line: str) -> bool:
        if self.op == "|=":
            return self.value in line
        if self.op == "!=":
            return self.value not in line
        hit = re.search(self.value, line) is not None
        return hit if self.op == "|~" else not hit


class JsonStage:
    pass


Stage = LineFilter | JsonStage | Matcher


@dataclass(frozen=True, slots=True)
class Query:
    selector: tuple[Matcher, ...]
    stages: tuple[Stage, ...]


def parse(query: str) -> Query:
    m = _SELECTOR.match(query.strip())
    if m is None:
        raise LogQLError(f"no stream selector in {query!r}")
    selector: list[Matcher] = []
    body = m.group("body")
    pos = 0
    while pos < len(body.strip()):
        mm = _MATCHER.match(body, pos)
        if mm is None:
            raise LogQLError(f"bad matcher at {body[pos:]!r}")
        selector.append(Matcher(mm["name"], mm["op"], _unquote(mm["value"])))
        pos = mm.end()
    rest = query.strip()[m.end() :]
    stages: list[Stage] = []
    while rest.strip():
        if jm := _JSON.match(rest):
            stages.append(JsonStage())
            rest = rest[jm.end() :]
        elif lm := _LINE_FILTER.match(rest):
            stages.append(LineFilter(lm["op"], _unquote(lm["value"])))
            rest = rest[lm.end() :]
        elif fm := _LABEL_FILTER.match(rest):
            stages.append(Matcher(fm["name"].replace(".", "_"), fm["op"], _unquote(fm["value"])))
            rest = rest[fm.end() :]
        else:
            raise LogQLError(f"unsupported stage at {rest!r}")
    return Query(tuple(selector), tuple(stages))


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "_"))
        elif isinstance(value, bool):
            out[name] = "true" if value else "false"
        elif value is None:
            out[name] = ""
        elif isinstance(value, list):
            out[name] = json.dumps(value)
        else:
            out[name] = str(value)
    return out


def run(query: str | Query, lines: Iterable[str], stream: Mapping[str, str]) -> list[str]:
    """The lines of one stream (its labels ``stream``) that the query selects."""
    q = parse(query) if isinstance(query, str) else query
    if not all(m.matches(stream.get(m.name, "")) for m in q.selector):
        return []
    out = []
    for line in lines:
        labels = dict(stream)
        keep = True
        for stage in q.stages:
            if isinstance(stage, LineFilter):
                keep = stage.matches(line)
            elif isinstance(stage, JsonStage):
                try:
                    doc = json.loads(line)
                except ValueError:
                    labels["__error__"] = "JSONParserErr"
                    continue
                if isinstance(doc, dict):
                    labels.update(flatten(doc))
            else:
                keep = stage.matches(labels.get(stage.name, ""))
            if not keep:
                break
        if keep:
            out.append(line)
    return out

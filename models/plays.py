"""Plays into speeches: who says what in a Gutenberg play text, stage directions dropped.

The federated corpus (models.corpus) makes one client of each speaking role
of a work; this module only parses. Roles are named in two styles across the
42 texts — ALL-CAPS names on a line of their own (or before the speech on the
same line) and Title-case names — and headings, settings, bylines and the
dramatis personae are skipped.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class Speech:
    work: str
    role: str
    text: str


_PERSONS = re.compile(r"^\s*(dramatis personae|persons represented)", re.I)
_BYLINE = re.compile(r"^\s*by william shakespeare\s*$", re.I)
_SETTING = re.compile(r"^\s*scene\b", re.I)
_HEADING = re.compile(r"^(act|scene)\b|^(prologue|epilogue|induction|the end|finis)\.?$", re.I)
_ROMAN = re.compile(r"^[IVXLC]+\.?$")
_CAPS_NAME = re.compile(r"^(?=(?:.*[A-Z]){2})[A-Z0-9][A-Z0-9 '&.-]{0,39}$")
_TITLE_NAME = re.compile(r"^(?:\d\s+)?[A-Z][a-z]*\.?(?:\s+[A-Z][a-z]*\.?){0,3}$")
_INLINE = re.compile(r"^([A-Z][A-Z' ]*[A-Z])\.\s+(\S.*)$")
_SPAN = re.compile(r"[\[{][^\[\]{}]*[\]}]")
_UNCLOSED = re.compile(r"[\[{][^\n]*")
_LEADING_CLOSE = re.compile(r"^([^\[\]{}]*)[\]}]")


def _name(line: str, caps: bool | None = None) -> str | None:
    """The normalised role if `line` looks like a speaker line, else None.

    `caps` restricts to ALL-CAPS names (True) or abbreviated Title-case ones
    (False); None accepts either.
    """
    line = line.strip()
    if not line or _HEADING.match(line) or _ROMAN.match(line):
        return None
    if ((caps is not False and _CAPS_NAME.match(line))
            or (caps is not True and line.endswith(".") and _TITLE_NAME.match(line)
                and not line.isupper())):
        return re.sub(r"\s+", " ", line).rstrip(".-").strip().upper()
    return None


def _drop_stage_directions(paragraph: str) -> str:
    """`paragraph` without ``[...]`` directions, tolerating the source's typos.

    The texts use ``{`` or ``}`` for brackets, nest them, or never close them; an
    unclosed one runs to the end of its line, and a paragraph that starts inside
    a direction begun in the previous paragraph is cut up to its ``]``.
    """
    lead = _LEADING_CLOSE.match(paragraph)
    if lead and _name(lead.group(1)) is None:
        paragraph = paragraph[lead.end():]
    while True:
        shorter = _SPAN.sub("", paragraph)
        if shorter == paragraph:
            break
        paragraph = shorter
    paragraph = _UNCLOSED.sub("", paragraph)
    return re.sub(r"[\]}]", "", paragraph)


def _body_lines(text: str) -> list[str]:
    """Lines of the play proper, stage directions blanked out.

    Front matter (title, byline, persons list) ends at the ``SCENE: <place>``
    line after the persons list.
    """
    lines = text.replace("\r\n", "\n").split("\n")
    start = next((i + 1 for i, line in enumerate(lines[:10]) if _BYLINE.match(line)), 0)
    for i, line in enumerate(lines[start:], start):
        if _PERSONS.match(line):
            start = next((j + 1 for j in range(i + 1, len(lines)) if _SETTING.match(lines[j])),
                         len(lines))
            break
    paragraphs = re.split(r"\n[ \t]*\n", "\n".join(lines[start:]))
    out: list[str] = []
    for paragraph in paragraphs:
        out.extend(_drop_stage_directions(paragraph).split("\n"))
        out.append("")
    return [line.strip() for line in out]


def parse_play(work: str, text: str) -> list[Speech]:
    """The speeches of one play, in order, without stage directions.

    A play names its speakers either in ALL CAPS or in abbreviated Title case;
    the majority decides, so that a one-word speech like ``Romeo.`` in an
    ALL-CAPS play is never taken for a speaker. A candidate speaker line must
    be directly followed by its speech somewhere in the play to count; that
    rules out headings and lets ``CHORUS.`` precede a blank line elsewhere.
    Title-case speaker lines must follow a blank line; ALL-CAPS ones need not,
    as the source sometimes omits it.
    """
    lines = _body_lines(text)
    candidates = [lines[i] for i in range(len(lines) - 1)
                  if (i == 0 or not lines[i - 1]) and lines[i + 1] and _name(lines[i])]
    caps = sum(c.isupper() for c in candidates) * 2 >= len(candidates)
    confirmed = {_name(c, caps) for c in candidates} - {None}
    speeches: list[Speech] = []
    role, buf = None, []

    def flush() -> None:
        if role and buf:
            speeches.append(Speech(work, role, " ".join(" ".join(buf).split())))

    for i, line in enumerate(lines):
        if not line:
            continue
        after_blank = i == 0 or not lines[i - 1]
        if after_blank or caps:
            name = _name(line, caps)
            inline = _INLINE.match(line) if caps and after_blank else None
            if name in confirmed:
                flush()
                role, buf = name, []
                continue
            if inline and inline.group(1) in confirmed:
                flush()
                role, buf = inline.group(1), [inline.group(2)]
                continue
        if after_blank and _HEADING.match(line):
            flush()
            role, buf = None, []
            continue
        if role:
            buf.append(line)
    flush()
    return speeches


def parse_texts(texts: Mapping[str, str]) -> list[Speech]:
    """All speeches of all works, works in sorted order."""
    return [s for work in sorted(texts) for s in parse_play(work, texts[work])]

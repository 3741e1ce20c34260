"""Why an attempt failed: a :class:`~mailstrom.status.ReasonClass` for a failed reply, and
what to do about it.

An explanation, not a decision: whether a failure is temporary or permanent stays with
:mod:`mailstrom.policy.classify` (the reply code). Every table lives in one data file,
``reasons.toml`` beside this module, read once on first use; its header says how a reply
is looked up. In short: the well-known replies of the big providers by (code, enhanced
code) and an optional phrase, then the RFC 3463 enhanced code when its detail says enough,
then text heuristics for vague replies, then the enhanced code's subject, then the basic
code.

Classifying is a few dictionary lookups; text is looked at only when the table has rules
for the reply's exact codes or when the enhanced code says little, so a reply costs about
a microsecond and only failed replies are classified at all.

>>> classify_reply(SMTPReply(code=550, enhanced="5.1.1", text="No such user"))
<ReasonClass.MAILBOX: 'mailbox'>
>>> advice(ReasonClass.GREYLISTED).action
'Nothing: the retry is scheduled and normally gets through within minutes.'
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from mailstrom.status import Attempt, ReasonClass, RecipientStatus, SMTPReply

DATA_FILE = "reasons.toml"
"""The data file, package data of :mod:`mailstrom.policy`."""

_RULE_KEYS = frozenset(
    {
        "provider",
        "code",
        "enhanced",
        "text",
        "pattern",
        "class",
        "status",
        "help",
        "action",
        "example",
    }
)
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_ENHANCED_RANGE = re.compile(r"([245]\.\d{1,3})\.(\d{1,3})-(\d{1,3})")
_QMAIL_STATUS = re.compile(r"\(#([245]\.\d{1,3}\.\d{1,3})\)\s*\Z")
"""qmail's status code, "(#5.7.1)" ending its reply: qmail-smtpd sends no RFC 2034 code."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Advice:
    """What a failure means and what to do about it, for people."""

    reason_class: ReasonClass
    meaning: str
    """What the class means, in a few words."""
    action: str
    """One line: what to do (the provider's advice when a rule knows the reply)."""
    help: str | None = None
    """The provider's page about this reply, when one is known."""
    provider: str | None = None
    """Whose reply it is ("Google", "Microsoft", "Yahoo"), when a rule recognised it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyRule:
    """One ``[[reply]]`` entry of the data file (see its header for the fields)."""

    index: int
    """Position in the file: rules are tried in this order."""
    reason_class: ReasonClass
    codes: tuple[int, ...]
    enhanced: tuple[str, ...]
    """Enhanced codes the rule is for (ranges expanded); empty for any."""
    text: tuple[str, ...] = ()
    """Lower-case phrases that must all appear."""
    pattern: re.Pattern[str] | None = None
    status: str | None = None
    """The enhanced code the reply stands for, when its own says otherwise or it has none
    (Exchange Online's 550 5.4.1 "Access denied" for an address it does not have: 5.1.1):
    what :mod:`mailstrom.policy.hardbounce` judges it by."""
    provider: str | None = None
    help: str | None = None
    action: str
    example: str

    def matches(self, text: str) -> bool:
        """Whether the rule takes a reply whose normalised text is ``text``."""
        for phrase in self.text:
            if phrase not in text:
                return False
        return self.pattern is None or self.pattern.search(text) is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class ClassInfo:
    meaning: str
    action: str


class ReasonTable:
    """The loaded data file, indexed for lookups (see :func:`load_table`)."""

    __slots__ = (
        "by_code",
        "by_key",
        "classes",
        "codes",
        "details",
        "local",
        "rules",
        "subjects",
    )

    def __init__(
        self,
        *,
        rules: Sequence[ReplyRule],
        classes: Mapping[ReasonClass, ClassInfo],
        details: Mapping[str, ReasonClass],
        subjects: Mapping[str, ReasonClass],
        local: Mapping[str, ReasonClass],
        codes: Mapping[int, ReasonClass],
    ) -> None:
        self.rules = tuple(rules)
        self.classes = dict(classes)
        self.details = dict(details)
        self.subjects = dict(subjects)
        self.local = dict(local)
        self.codes = dict(codes)
        by_key: dict[tuple[int, str], list[ReplyRule]] = {}
        by_code: dict[int, list[ReplyRule]] = {}
        for rule in self.rules:
            for code in rule.codes:
                if rule.enhanced:
                    for enhanced in rule.enhanced:
                        by_key.setdefault((code, enhanced), []).append(rule)
                else:
                    by_code.setdefault(code, []).append(rule)
        self.by_key = {key: tuple(rules) for key, rules in by_key.items()}
        self.by_code = {code: tuple(rules) for code, rules in by_code.items()}

    def match(self, reply: SMTPReply) -> ReplyRule | None:
        """The first rule that takes ``reply`` (steps 1 and 3 of the lookup), or None."""
        return self._match(reply, _status_code(reply))

    def _match(self, reply: SMTPReply, enhanced: str | None) -> ReplyRule | None:
        normalised: str | None = None
        if enhanced is not None:
            candidates = self.by_key.get((reply.code, enhanced))
            if candidates:
                normalised = _normalise(reply.text)
                for rule in candidates:
                    if rule.matches(normalised):
                        return rule
            if _detail(enhanced) in self.details:
                return None  # the enhanced code says enough: no heuristics
        candidates = self.by_code.get(reply.code)
        if candidates:
            if normalised is None:
                normalised = _normalise(reply.text)
            for rule in candidates:
                if rule.matches(normalised):
                    return rule
        return None

    def classify(self, reply: SMTPReply) -> ReasonClass:
        """The class of a failed ``reply`` (see the module docstring)."""
        enhanced = _status_code(reply)
        rule = self._match(reply, enhanced)
        if rule is not None:
            return rule.reason_class
        return self._by_codes(enhanced, reply.code)

    def classify_local(self, enhanced: str | None) -> ReasonClass:
        """The class of a failure without a reply that carries ``enhanced`` (or nothing)."""
        if enhanced is not None:
            found = self.local.get(_detail(enhanced))
            if found is not None:
                return found
        return self._by_codes(enhanced, None)

    def _by_codes(self, enhanced: str | None, code: int | None) -> ReasonClass:
        if enhanced is not None:
            detail = _detail(enhanced)
            found = self.details.get(detail)
            if found is None:
                found = self.subjects.get(detail.partition(".")[0])
            if found is not None:
                return found
        if code is None:
            return ReasonClass.OTHER
        found = self.codes.get(code)
        if found is not None:
            return found
        # A code outside 4yz/5yz where a failure was decided is a protocol violation.
        return ReasonClass.OTHER if 400 <= code < 600 else ReasonClass.PROTOCOL


def _status_code(reply: SMTPReply) -> str | None:
    """The enhanced status code ``reply`` is classified by: its own, or for a reply
    without one the "(#5.7.1)" qmail ends its replies with, when its class is the reply
    code's (a 4.x.x in a 5yz reply is no status of it)."""
    if reply.enhanced is not None:
        return reply.enhanced
    return qmail_status(reply.code, reply.text)


def qmail_status(code: int, text: str) -> str | None:
    """The "(#5.7.1)" ending ``text``, the status qmail gives in place of an RFC 2034 code,
    when its class is reply ``code``'s; else None."""
    found = _QMAIL_STATUS.search(text)
    if found is None or found.group(1)[0] != str(code)[0]:
        return None
    return found.group(1)


def _normalise(text: str) -> str:
    """Lower case, every run of whitespace (line breaks too) one space: how rules see a
    reply's text, as their phrases are stored. A wrapped line that ends in a space, a tab
    or a doubled space must not keep a phrase from matching."""
    return " ".join(text.lower().split())


def _detail(enhanced: str) -> str:
    """ "5.7.26" → "7.26": RFC 3463 subjects and details mean the same in every class."""
    return enhanced.partition(".")[2]


# --- loading ----------------------------------------------------------------------------------


def load_table(text: str | None = None) -> ReasonTable:
    """Parse and check the data file (or ``text`` in its format).

    Raises ValueError naming the entry for anything malformed: an unknown key or class, a
    code outside 200-599, an enhanced code or range that is not one, a pattern that does
    not compile, a help link that is not https, a class without ``[classes]`` advice.
    """
    if text is None:
        text = resources.files("mailstrom.policy").joinpath(DATA_FILE).read_text("utf-8")
    doc = tomllib.loads(text)
    unknown = set(doc) - {"classes", "reply", "enhanced", "subjects", "local", "codes"}
    if unknown:
        raise ValueError(f"{DATA_FILE}: unknown tables {sorted(unknown)}")
    classes = {
        _class(name, "[classes]"): _class_info(name, value)
        for name, value in _table(doc, "classes").items()
    }
    missing = set(ReasonClass) - set(classes)
    if missing:
        raise ValueError(f"{DATA_FILE}: [classes] lacks {sorted(missing)}")
    rules = [_rule(i, entry) for i, entry in enumerate(doc.get("reply", []))]
    details = _by_detail(doc, "enhanced", 2)
    subjects = _by_detail(doc, "subjects", 1)
    local = _by_detail(doc, "local", 2)
    codes = {
        _code(k, "[codes]"): _class(v, f"[codes] {k}") for k, v in _table(doc, "codes").items()
    }
    return ReasonTable(
        rules=rules, classes=classes, details=details, subjects=subjects, local=local, codes=codes
    )


def _table(doc: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ValueError(f"{DATA_FILE}: [{name}] must be a table")
    return value


def _class(value: object, where: str) -> ReasonClass:
    try:
        return ReasonClass(str(value))
    except ValueError:
        raise ValueError(f"{DATA_FILE}: {where}: unknown class {value!r}") from None


def _class_info(name: str, value: object) -> ClassInfo:
    if not isinstance(value, dict) or set(value) != {"meaning", "action"}:
        raise ValueError(f"{DATA_FILE}: [classes.{name}] needs exactly meaning and action")
    return ClassInfo(meaning=str(value["meaning"]), action=str(value["action"]))


def _by_detail(doc: Mapping[str, Any], name: str, parts: int) -> dict[str, ReasonClass]:
    """A table keyed by "subject.detail" (``parts`` 2) or "subject" (1)."""
    found = {}
    for key, value in _table(doc, name).items():
        pieces = key.split(".")
        if len(pieces) != parts or not all(p.isdigit() and len(p) <= 3 for p in pieces):
            raise ValueError(f"{DATA_FILE}: [{name}] key {key!r} is not a subject.detail")
        found[key] = _class(value, f"[{name}] {key}")
    return found


def _code(value: object, where: str) -> int:
    code = int(value) if isinstance(value, int | str) and str(value).isdigit() else -1
    if not 200 <= code <= 599:
        raise ValueError(f"{DATA_FILE}: {where}: {value!r} is no reply code")
    return code


def _strings(value: object, where: str) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) and v for v in items):
        raise ValueError(f"{DATA_FILE}: {where}: expected a string or a list of strings")
    return tuple(items)


def _expand(enhanced: str, where: str) -> list[str]:
    """An enhanced code, or every code of a range such as "4.7.500-699"."""
    if _ENHANCED.fullmatch(enhanced):
        return [enhanced]
    match = _ENHANCED_RANGE.fullmatch(enhanced)
    if match is None or int(match.group(2)) >= int(match.group(3)):
        raise ValueError(f"{DATA_FILE}: {where}: {enhanced!r} is no enhanced code or range")
    prefix, low, high = match.group(1), int(match.group(2)), int(match.group(3))
    return [f"{prefix}.{n}" for n in range(low, high + 1)]


def _rule(index: int, entry: Mapping[str, Any]) -> ReplyRule:
    where = f"[[reply]] #{index + 1} ({entry.get('example', '?')!r})"
    unknown = set(entry) - _RULE_KEYS
    if unknown:
        raise ValueError(f"{DATA_FILE}: {where}: unknown keys {sorted(unknown)}")
    for required in ("code", "class", "action", "example"):
        if required not in entry:
            raise ValueError(f"{DATA_FILE}: {where}: {required} is missing")
    raw_codes = entry["code"] if isinstance(entry["code"], list) else [entry["code"]]
    codes = tuple(_code(c, where) for c in raw_codes)
    enhanced: list[str] = []
    if "enhanced" in entry:
        for value in _strings(entry["enhanced"], where):
            enhanced += _expand(value, where)
    text: tuple[str, ...] = ()
    if "text" in entry:
        text = tuple(" ".join(t.lower().split()) for t in _strings(entry["text"], where))
    pattern = None
    if "pattern" in entry:
        try:
            pattern = re.compile(str(entry["pattern"]))
        except re.error as exc:
            raise ValueError(f"{DATA_FILE}: {where}: bad pattern: {exc}") from None
    status = entry.get("status")
    if status is not None and not (isinstance(status, str) and _ENHANCED.fullmatch(status)):
        raise ValueError(f"{DATA_FILE}: {where}: status {status!r} is no enhanced code")
    help_url = entry.get("help")
    if help_url is not None and not str(help_url).startswith("https://"):
        raise ValueError(f"{DATA_FILE}: {where}: help must be an https:// link")
    return ReplyRule(
        index=index,
        reason_class=_class(entry["class"], where),
        codes=codes,
        enhanced=tuple(enhanced),
        text=text,
        pattern=pattern,
        status=status,
        provider=str(entry["provider"]) if "provider" in entry else None,
        help=str(help_url) if help_url is not None else None,
        action=str(entry["action"]),
        example=str(entry["example"]),
    )


@functools.cache
def table() -> ReasonTable:
    """The packaged table, loaded on first use (a few milliseconds) and kept."""
    return load_table()


# --- the API ----------------------------------------------------------------------------------


def classify_reply(reply: SMTPReply) -> ReasonClass:
    """The class of a failed ``reply`` (never ask about a positive one: nothing failed).

    >>> classify_reply(SMTPReply(code=451, enhanced="4.7.1", text="Greylisted, try later"))
    <ReasonClass.GREYLISTED: 'greylisted'>
    """
    return table().classify(reply)


def stands_for(reply: SMTPReply) -> str | None:
    """The enhanced code a rule of the table says ``reply`` stands for (its ``status``),
    or None: a provider's words for "no such mailbox" under another code, or none.

    >>> stands_for(SMTPReply(code=554, enhanced=None,
    ...                      text="delivery error: dd This user doesn't have a yahoo.com account"))
    '5.1.1'
    >>> stands_for(SMTPReply(code=550, enhanced="5.1.1", text="No such user"))
    """
    rule = table().match(reply)
    return None if rule is None else rule.status


def classify_local(enhanced: str | None) -> ReasonClass:
    """The class of a failure without a reply from its enhanced code (mailstrom's own:
    4.4.3 a DNS failure, 5.1.2 no such domain, 5.4.4 no route...); OTHER without one.
    Errors whose type says more (TLS, connection, protocol) are classified by the runtime
    before it asks this."""
    return table().classify_local(enhanced)


def advice(reason_class: ReasonClass, reply: SMTPReply | None = None) -> Advice:
    """What ``reason_class`` means and what to do; when a rule of the table recognises
    ``reply`` as of that same class, its provider, help page and advice."""
    t = table()
    info = t.classes[reason_class]
    rule = t.match(reply) if reply is not None else None
    if rule is None or rule.reason_class is not reason_class:
        return Advice(reason_class=reason_class, meaning=info.meaning, action=info.action)
    return Advice(
        reason_class=reason_class,
        meaning=info.meaning,
        action=rule.action,
        help=rule.help,
        provider=rule.provider,
    )


def advice_for(subject: Attempt | RecipientStatus) -> Advice | None:
    """:func:`advice` for a recorded attempt or a recipient's latest one; None when it did
    not fail (or was recorded before classes existed)."""
    if subject.reason_class is None:
        return None
    return advice(subject.reason_class, subject.reply)

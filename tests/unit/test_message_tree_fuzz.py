"""Fuzzing ``prepare()`` with hostile stdlib ``Message`` trees, compat32 and policy-based.

``send_email()`` takes the trees users build by hand: ``MIMEMultipart`` of ``MIMEBase``
parts with ``add_header(..., filename=...)``, ``email.header.Header`` values,
``set_boundary()``, ``EmailMessage.add_attachment()`` and friends. The stdlib stores most
of what it is given and writes it as it is, so these trees are filled with header names
and values from hostile alphabets (CR, LF, NUL, the other characters ``str.splitlines``
breaks at, surrogates, encoded-word lookalikes, very long values), odd payloads, odd
charsets and boundaries that occur in bodies or hold quotes.

The properties, for every tree:

(a) ``prepare()`` returns or raises an :class:`~mailstrom.errors.InvalidMessage`
    subclass, never another exception;
(b) what it returns obeys the wire rules (CRLF only, lines of at most 998 octets) and
    **nothing was injected**: read back with ``BytesParser(policy=policy.default)``, the
    entities have the structure that was built (no part forged from a header value or a
    body), and each entity's header field names are ones its tree set, or one of those
    that mailstrom and the stdlib legitimately add (see :data:`ADDED_ANYWHERE`);
(c) it takes bounded time: each example has a deadline, and trees near the bounds
    (:data:`MAX_PARTS`, :data:`MAX_DEPTH`, :data:`MAX_HEADER_FIELDS`) are built too, so a
    quadratic walk or write would show as a deadline failure. Hypothesis checks the
    deadline only once an example returns, so a call still running after :data:`HANG`
    seconds is interrupted and fails (the stdlib's folder looped for ever on a long
    parameter name).

What the stdlib legitimately adds or reshapes is allowed, each case where it is decided
(:data:`ADDED_AT_TOP`, :data:`ADDED_ANYWHERE`, :func:`expected`,
:func:`check_no_injection`): Date and Message-ID at the top, Content-Type and friends
where the writer re-encodes or picks a boundary, one empty part in an empty multipart,
the first message only of a message/rfc822 part, a digest's untyped parts, and the body
of a multipart or message/* part whose payload is a string (the caller's to write).

Fresh examples, as many as you like::

    MAILSTROM_HYPOTHESIS=explore MAILSTROM_FUZZ_EXAMPLES=5000 \\
        .venv/bin/python -m pytest --timeout=0 tests/unit/test_message_tree_fuzz.py
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email import policy
from email.charset import Charset
from email.errors import MissingHeaderBodySeparatorDefect
from email.header import Header
from email.message import EmailMessage, Message
from email.mime.application import MIMEApplication
from email.mime.base import MIMEBase
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.parser import BytesParser
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from tests.support.deadline import hang_guard
from tests.support.wire import check_line_ends_and_lengths

from mailstrom.errors import InvalidMessage, NestingTooDeep, TooManyHeaderFields, TooManyParts
from mailstrom.message import prepare
from mailstrom.message.bounds import MAX_HEADER_FIELDS, MAX_PARTS
from mailstrom.message.mime import MAX_DEPTH

NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
EXAMPLES = int(os.environ.get("MAILSTROM_FUZZ_EXAMPLES", "200"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    # Small trees take milliseconds; two seconds are only passed by a blow-up.
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- hostile alphabets -------------------------------------------------------------------

FRAGMENTS = [
    "\r\n",
    "\n",
    "\r",
    "\r\n ",
    "\n\t",
    "\r\nX-Injected: 1",
    "\nX-Injected: 1",
    "\r\n\r\n--B\r\nX-Forged: 1\r\n\r\n",
    "\0",
    "\x01",
    "\t",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x1e",
    "\x7f",
    "\x85",
    "\u2028",
    "\u2029",
    "\ud800",
    "=?utf-8?q?a?=",
    "=?utf-8?q?=0D=0AX-Injected:_1?=",
    "=?iso-8859-1?b?6Q==?=",
    "; filename*=utf-8''%0D%0AX-Injected%3A%201",
    "%0D%0A",
    "=?",
    "?=",
    "é",
    "日本",
    "😀",
    "\xa0",
    '"',
    "\\",
    ";",
    "=",
    " ",
    ":",
    "<a@example.org>",
    "--B",
    "--B--",
    "boundary=B",
    'boundary="B"',
    "x" * 80,
]
HOSTILE = st.one_of(
    st.text(max_size=30),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=5)), max_size=8).map("".join),
    st.sampled_from(FRAGMENTS),
)
LONG = st.one_of(
    st.integers(900, 1100).map(lambda n: "x" * n),  # one word over the line limit
    st.integers(100, 3000).map(lambda n: "word " * n),  # folds into many lines
    st.integers(60_000, 70_000).map(lambda n: "y" * n),  # about MAX_FIELD
    # Comments nested deeper than the stdlib's parser recurses, within the token bound.
    st.integers(240, 490).map(lambda n: "(" * n + ")" * n),
)
SAFE = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=30)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` three times in four, else ``bad``: most trees reach the stdlib's writer."""
    return st.integers(0, 3).flatmap(lambda roll: bad if roll == 0 else good)


# Now and then a long value, to reach the writer's folder and the field size bound.
VALUES = st.integers(0, 19).flatmap(lambda roll: LONG if roll == 0 else mostly(SAFE, HOSTILE))
NAMES = mostly(
    st.sampled_from(
        [
            "X-Note",
            "Subject",
            "Comments",
            "Keywords",
            "Content-Type",
            "Content-Disposition",
            "Content-Transfer-Encoding",
            "Content-ID",
            "MIME-Version",
            "To",
            "Cc",
            "Bcc",
            "Reply-To",
            "Message-ID",
            "Date",
        ]
    ),
    HOSTILE,
)
CHARSETS = st.sampled_from(
    [
        "utf-8",
        "us-ascii",
        "iso-8859-1",
        "iso-2022-jp",
        "euc-jp",
        "koi8-r",
        "utf-16",
        "utf-7",
        "x-unknown",
        "",
        "utf-8\r\nX-Injected: 1",
        '"',
    ]
)
BOUNDARIES = st.one_of(
    st.sampled_from(["B", "=_x", 'a"b', '"', "a\\b", "a b", "é", "", " ", "B--", "x" * 80]),
    HOSTILE,
)
PARAMS = st.dictionaries(
    mostly(st.sampled_from(["filename", "name", "charset", "format", "boundary"]), HOSTILE),
    st.one_of(VALUES, st.tuples(CHARSETS, st.sampled_from(["", "en"]), VALUES)),
    max_size=2,
)
BODIES = st.one_of(
    mostly(st.text(max_size=200), HOSTILE),
    st.sampled_from(["--B\n", "a\n--B\nX-Forged: 1\n\nb\n--B--\n", "From x\n", ".\r\n"]),
    st.integers(900, 1100).map(lambda n: "z" * n),
)
PAYLOADS = st.one_of(
    BODIES,
    st.binary(max_size=200),
    st.none(),
    st.sampled_from([3, object(), ["not a part"], [b"bytes"]]),
)


# --- building trees ----------------------------------------------------------------------


def attempt(action: Callable[..., object], *args: Any, **kwargs: Any) -> None:
    """Run one building step; the stdlib refuses many hostile values itself, and a tree
    it refused to build is not ``prepare()``'s to judge."""
    with contextlib.suppress(Exception):
        action(*args, **kwargs)


def header_value(draw: Any) -> Any:
    """A header value as a tree holds it: a string, or an ``email.header.Header``."""
    value = draw(VALUES)
    if draw(st.integers(0, 5)):
        return value
    charset = draw(st.sampled_from([None, "utf-8", "iso-8859-1", "us-ascii"]))
    try:
        return Header(value, charset) if charset else Header(value)
    except Exception:
        return value


def set_headers(draw: Any, part: Message) -> None:
    """Add, set and replace header fields and parameters of ``part`` as users do."""
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.sampled_from(["item", "add_header", "set_param", "replace", "raw"]))
        name = draw(NAMES)
        if how == "item":
            value = header_value(draw)
            attempt(part.__setitem__, name, value)
        elif how == "add_header":
            value = draw(VALUES)
            params = draw(PARAMS)
            attempt(part.add_header, name, value, **params)
        elif how == "set_param":
            param, value = draw(HOSTILE), draw(VALUES)
            header = draw(st.sampled_from(["Content-Type", "Content-Disposition", name]))
            charset, language = draw(st.sampled_from([(None, ""), ("utf-8", "en")]))
            requote = draw(st.booleans())
            attempt(
                part.set_param,
                param,
                value,
                header=header,
                requote=requote,
                charset=charset,
                language=language,
            )
        elif how == "replace":
            value = header_value(draw)
            attempt(part.replace_header, name, value)
        else:
            # What parsing source leaves in a message: the value as a raw string, which
            # an EmailMessage keeps until it is read.
            value = draw(VALUES)
            attempt(part._headers.append, (name, value))  # type: ignore[attr-defined]


def compat32_leaf(draw: Any) -> Message:
    kind = draw(st.sampled_from(["Message", "MIMEText", "MIMEBase", "MIMEApplication"]))
    part: Message
    try:
        if kind == "MIMEText":
            text = draw(BODIES)
            part = MIMEText(
                text, draw(st.sampled_from(["plain", "html"])), draw(st.none() | CHARSETS)
            )
        elif kind == "MIMEBase":
            part = MIMEBase(
                draw(st.sampled_from(["application", "image", "text", "message", "multipart"])),
                draw(st.sampled_from(["octet-stream", "png", "plain", "rfc822", "mixed"])),
            )
        elif kind == "MIMEApplication":
            part = MIMEApplication(draw(st.binary(max_size=300)))
        else:
            part = Message()
    except Exception:
        part = Message()
    if kind in ("Message", "MIMEBase") or draw(st.integers(0, 4)) == 0:
        payload = draw(PAYLOADS)
        charset = draw(st.none() | CHARSETS)
        attempt(lambda: part.set_payload(payload, charset))
    if draw(st.integers(0, 6)) == 0:
        charset = draw(CHARSETS)
        attempt(lambda: part.set_charset(Charset(charset) if draw(st.booleans()) else charset))
    return part


def compat32_tree(draw: Any, depth: int) -> Message:
    kind = draw(
        st.sampled_from(["leaf", "leaf", "multipart", "message"]) if depth < 3 else st.just("leaf")
    )
    if kind == "multipart":
        subtype = draw(st.sampled_from(["mixed", "alternative", "related", "digest"]))
        part: Message = MIMEMultipart(subtype)
        for _ in range(draw(st.integers(0, 3))):
            child = compat32_tree(draw, depth + 1)
            attempt(part.attach, child)
        if draw(st.integers(0, 2)) == 0:
            boundary = draw(BOUNDARIES)
            attempt(lambda: part.set_boundary(boundary))
    elif kind == "message":
        part = MIMEMessage(compat32_tree(draw, depth + 1))
    else:
        part = compat32_leaf(draw)
    set_headers(draw, part)
    return part


CONTENT_KWARGS = st.fixed_dictionaries(
    {},
    optional={
        "disposition": mostly(st.sampled_from(["attachment", "inline"]), HOSTILE),
        "filename": VALUES,
        "cid": mostly(st.just("<c@example.org>"), VALUES),
        "params": PARAMS,
        "headers": st.lists(st.tuples(NAMES, VALUES).map(lambda t: f"{t[0]}: {t[1]}"), max_size=2),
    },
)


def set_content(draw: Any, part: EmailMessage, how: str) -> None:
    """``set_content`` or ``add_*``, with text, bytes or a message as the content."""
    method = getattr(part, how)
    what = draw(st.sampled_from(["text", "bytes", "message"]))
    kwargs = draw(CONTENT_KWARGS)
    if what == "text":
        kwargs.update(
            draw(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "subtype": mostly(st.sampled_from(["plain", "html"]), HOSTILE),
                        "charset": CHARSETS,
                        "cte": st.sampled_from(["7bit", "8bit", "base64", "quoted-printable"]),
                    },
                )
            )
        )
        content: Any = draw(BODIES)
        attempt(lambda: method(content, **kwargs))
    elif what == "bytes":
        maintype = draw(mostly(st.sampled_from(["application", "image", "text"]), HOSTILE))
        subtype = draw(mostly(st.sampled_from(["octet-stream", "png", "plain"]), HOSTILE))
        content = draw(st.binary(max_size=300))
        attempt(lambda: method(content, maintype, subtype, **kwargs))
    else:
        inner = email_tree(draw, 3)  # one level: a forwarded message
        kwargs.pop("params", None)
        attempt(lambda: method(inner, **kwargs))


def email_tree(draw: Any, depth: int) -> EmailMessage:
    part = EmailMessage(policy=draw(st.sampled_from([policy.default, policy.SMTP])))
    set_headers(draw, part)
    set_content(draw, part, "set_content")
    if depth < 3:
        for _ in range(draw(st.integers(0, 3))):
            how = draw(
                st.sampled_from(
                    ["add_attachment", "add_related", "add_alternative", "make_mixed", "attach"]
                )
            )
            if how == "make_mixed":
                attempt(part.make_mixed)
            elif how == "attach":
                child = email_tree(draw, depth + 1)
                attempt(part.attach, child)
            else:
                set_content(draw, part, how)
    return part


ADDRESSES = st.integers(0, 9).flatmap(
    lambda roll: (
        VALUES
        if roll == 0
        else st.sampled_from(["a@example.com", "Zoë <z@example.org>", "jörg@exämple.org"])
    )
)


@st.composite
def trees(draw: Any) -> Message:
    """A whole message: a compat32 or policy-based tree, usually with a From and a To."""
    message: Message = email_tree(draw, 0) if draw(st.booleans()) else compat32_tree(draw, 0)
    if draw(st.integers(0, 4)):
        # Most trees get sound address fields, so that prepare() reaches the writer.
        for name in ("From", "To", "Cc", "Bcc", "Reply-To", "Sender"):
            del message[name]
    for name in ("From", "To"):
        if name not in message:
            value = draw(ADDRESSES)
            attempt(message.__setitem__, name, value)
    return message


# --- the oracle --------------------------------------------------------------------------

ADDED_AT_TOP = frozenset({"date", "message-id"})
"""prepare() adds a missing Date and Message-ID to the message (not to attached ones)."""

ADDED_ANYWHERE = frozenset({"content-type", "content-transfer-encoding", "mime-version"})
"""What the stdlib's writer may add to an entity: a multipart without a boundary gets one
(``Generator._handle_multipart`` calls ``set_boundary``, adding Content-Type when there
was none), and a part whose payload it must re-encode for the policy's ``cte_type``
gets its payload set again, with Content-Type, Content-Transfer-Encoding and
MIME-Version (``Generator._handle_text`` → ``set_payload(payload, charset)``)."""


@dataclass(frozen=True)
class Expected:
    """What an entity of the built tree must read back as."""

    names: frozenset[str]
    children: tuple[Expected, ...] | None
    """None: a leaf, or an entity whose read-back structure the tree does not decide."""
    leaf: bool
    """The entity is a leaf (a text or binary body) and must read back as one."""


def expected(part: Message, *, parent_type: str = "") -> Expected:
    """The expectations of ``part`` (recursion is fine: trees here are shallow)."""
    names = frozenset(name.lower() for name in part)
    payload = part._payload  # type: ignore[attr-defined]
    try:
        maintype = part.get_content_maintype()
    except UnicodeError:
        # str() of a compat32 Content-Type holding a lone surrogate raises, so the tree
        # has no type to expect; the writer reads the value its own way (and may drop
        # what it cannot parse). Its fields are still checked.
        return Expected(names=names, children=None, leaf=False)
    if parent_type == "multipart/digest" and "content-type" not in names:
        # The parser reads a part of a digest without Content-Type as message/rfc822
        # (RFC 2046 §5.1.5); a hand-made part's default type is text/plain. The tree
        # does not say which it is.
        return Expected(names=names, children=None, leaf=False)
    if isinstance(payload, list) and not all(isinstance(kid, Message) for kid in payload):
        # prepare() refuses it (a multipart's parts must be messages).
        return Expected(names=names, children=None, leaf=False)
    if maintype == "multipart" and isinstance(payload, list):
        kids = tuple(expected(kid, parent_type=part.get_content_type()) for kid in payload)
        return Expected(names=names, children=kids, leaf=False)
    if (
        maintype == "message"
        and part.get_content_type() != "message/delivery-status"
        and isinstance(payload, list)
        and payload
    ):
        # The writer writes the first message only (Generator._handle_message).
        return Expected(names=names, children=(expected(payload[0]),), leaf=False)
    # A multipart or message/* type with a string payload: the user wrote the body, and
    # what it holds is theirs (the stdlib writes it as it is). Any other type reads back
    # as a leaf.
    return Expected(names=names, children=None, leaf=maintype not in ("multipart", "message"))


def check_no_injection(built: Expected, written: Message, *, top: bool) -> None:
    """``written`` (parsed from the output) matches ``built``: nothing was injected."""
    allowed = built.names | ADDED_ANYWHERE | (ADDED_AT_TOP if top else frozenset())
    names = {name.lower() for name in written}
    assert names <= allowed, f"injected header fields: {sorted(names - allowed)}"
    assert not any(isinstance(d, MissingHeaderBodySeparatorDefect) for d in written.defects), (
        "a header line without a colon: a forged line or body"
    )
    if built.leaf:
        assert not written.is_multipart(), "a leaf was read back with parts"
    if built.children is None:
        return
    parts = written.get_payload()
    assert isinstance(parts, list), "a multipart or message was read back without parts"
    if not built.children and written.get_content_maintype() == "multipart":
        # The writer gives an empty multipart one empty part (RFC 2046 §5.1.1 requires
        # one): a delimiter line and the close delimiter. In a digest that part reads as
        # an empty message/rfc822 (RFC 2046 §5.1.5).
        assert len(parts) == 1
        empty = parts[0]
        if written.get_content_type() == "multipart/digest":
            assert not empty.keys()
            empty = empty.get_payload(0)
        assert not empty.keys() and not empty.get_payload()
        return
    assert len(parts) == len(built.children), (
        f"{len(built.children)} parts built, {len(parts)} read back"
    )
    for kid, part in zip(built.children, parts, strict=True):
        check_no_injection(kid, part, top=False)


def describe(part: Message, indent: str = "") -> str:
    """The tree as its headers and payload types, for a failing example's report."""
    lines = [f"{indent}{type(part).__name__}"]
    lines += [f"{indent}  {name}: {value!r:.300}" for name, value in part._headers]  # type: ignore[attr-defined]
    payload = part._payload  # type: ignore[attr-defined]
    if isinstance(payload, list):
        lines += [
            describe(kid, indent + "    ") if isinstance(kid, Message) else repr(kid)
            for kid in payload
        ]
    else:
        lines.append(f"{indent}  payload: {payload!r:.300}")
    return "\n".join(lines)


HANG = 20
"""Seconds after which prepare() is taken to loop for ever (the stdlib's folder can)."""


def check(message: Message) -> bool:
    """The property (module docstring): True when prepare() accepted the tree."""
    built = expected(message)
    try:
        with hang_guard(HANG):
            prepared = prepare(message, now=NOW)
    except InvalidMessage as exc:
        event(f"rejected: {type(exc).__name__}")
        return False
    check_line_ends_and_lengths(prepared.data)
    written = BytesParser(policy=policy.default).parsebytes(prepared.data)
    check_no_injection(built, written, top=True)
    return True


@SETTINGS
@given(message=trees())
def test_hostile_trees_get_a_typed_error_or_uninjected_output(message: Message) -> None:
    note(describe(message))
    event("accepted" if check(message) else "rejected")


# --- near the bounds ---------------------------------------------------------------------


def wide(parts: int) -> Message:
    root = MIMEMultipart()
    for _ in range(parts - 1):
        root.attach(MIMEText("x"))
    return root


def deep(levels: int, kind: str) -> Message:
    inner: Message = MIMEText("x")
    for _ in range(levels - 1):
        outer: Message = MIMEMultipart() if kind == "multipart" else MIMEMessage(inner)
        if kind == "multipart":
            outer.attach(inner)
        inner = outer
    return inner


def many_fields(fields: int, where: str) -> Message:
    """A tree whose top (with the Date and Message-ID prepare() adds) or whose part holds
    ``fields`` header fields once written."""
    root = MIMEMultipart()
    root["From"] = "a@example.com"
    root["To"] = "b@example.org"
    part = MIMEText("x")
    root.attach(part)
    target = root if where == "top" else part
    for number in range(fields - len(target) - (2 if where == "top" else 0)):
        target[f"X-F{number % 7}"] = "v"
    return root


BIG_TREES = st.one_of(
    st.integers(MAX_PARTS - 3, MAX_PARTS + 3).map(lambda n: ("parts", n, wide(n))),
    st.tuples(st.integers(MAX_DEPTH - 2, MAX_DEPTH + 4), st.sampled_from(["multipart", "msg"])).map(
        lambda t: ("depth", t[0], deep(t[0], t[1]))
    ),
    st.tuples(
        st.integers(MAX_HEADER_FIELDS - 3, MAX_HEADER_FIELDS + 3), st.sampled_from(["top", "part"])
    ).map(lambda t: ("fields", t[0], many_fields(t[0], t[1]))),
)


@settings(
    max_examples=max(10, EXAMPLES // 50),
    # A thousand entities take a few hundred milliseconds; a quadratic walk would not.
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(big=BIG_TREES)
def test_trees_near_the_bounds(big: tuple[str, int, Message]) -> None:
    """Near MAX_PARTS, MAX_DEPTH and MAX_HEADER_FIELDS: the bound's own error past it,
    the property's checks within it."""
    bound, count, message = big
    if "From" not in message:
        message["From"] = "a@example.com"
        message["To"] = "b@example.org"
    errors = {"parts": TooManyParts, "depth": NestingTooDeep, "fields": TooManyHeaderFields}
    limits = {"parts": MAX_PARTS, "depth": MAX_DEPTH + 1, "fields": MAX_HEADER_FIELDS}
    if count > limits[bound]:
        try:
            prepare(message, now=NOW)
        except errors[bound]:
            return
        raise AssertionError(f"{count} {bound} were accepted")
    assert check(message), f"{count} {bound} were refused"


def nested_comments(levels: int) -> str:
    """A comment holding a comment ... ``levels`` deep: RFC 5322 §3.2.2 sets no bound."""
    return "(" * levels + "x" + ")" * levels


def comments_in_a_part_field() -> Message:
    root = MIMEMultipart()
    root["From"] = "a@example.com"
    root["To"] = "b@example.org"
    part = MIMEText("x")
    part.replace_header("Content-Type", "text/plain " + nested_comments(400))
    root.attach(part)
    return root


def comments_in_an_attached_address() -> Message:
    # An attached message's field that our parser cannot read is carried, and so handed
    # to the stdlib's.
    inner = Message()
    inner["From"] = "x@example.com " + nested_comments(400) + " <"
    inner.set_payload("x")
    root = MIMEMultipart()
    root["From"] = "a@example.com"
    root["To"] = "b@example.org"
    root.attach(MIMEMessage(inner))
    return root


def in_a_deep_stack(depth: int, call: Callable[[], object]) -> object:
    return call() if depth <= 0 else in_a_deep_stack(depth - 1, call)


@pytest.mark.parametrize(
    "make",
    [comments_in_a_part_field, comments_in_an_attached_address],
    ids=["part-content-type", "attached-from"],
)
def test_a_field_nested_past_the_stdlibs_stack_is_refused(make: Callable[[], Message]) -> None:
    """The stdlib's writer parses a structured field by recursion, a few frames per level
    of comment nesting (a message parsed with compat32 from anyone's bytes holds what it
    was sent): 400 levels, within the token bound, raised RecursionError from prepare()."""
    with pytest.raises(InvalidMessage, match="nested too deep"):
        prepare(make(), now=NOW)


def test_a_deep_tree_prepared_in_a_deep_stack_is_refused_not_crashed() -> None:
    """The writer also recurses a few frames per MIME level: a tree within MAX_DEPTH,
    prepared where most of the stack is used, gets the typed error too."""
    import sys

    message = deep(MAX_DEPTH, "multipart")
    message["From"] = "a@example.com"
    message["To"] = "b@example.org"
    with pytest.raises(InvalidMessage, match="nested too deep"):
        in_a_deep_stack(sys.getrecursionlimit() - 250, lambda: prepare(message, now=NOW))


def test_the_oracle_sees_an_injected_header_and_a_forged_part() -> None:
    """The property is not vacuous: output with an injected field or a forged part, as the
    stdlib wrote it before the fixes, fails it."""
    root = MIMEMultipart(boundary="B")
    root["From"] = "a@example.com"
    root["To"] = "b@example.org"
    root.attach(MIMEText("x"))
    built = expected(root)
    good = root.as_bytes(policy=policy.SMTP)
    parse = BytesParser(policy=policy.default).parsebytes
    check_no_injection(built, parse(good), top=True)
    injected = good.replace(b"To: b@example.org\r\n", b"To: b@example.org\r\nX-Injected: 1\r\n")
    forged = good.replace(b"\r\n--B--", b"\r\n--B\r\n\r\nforged\r\n--B--")
    for bad in (injected, forged):
        with pytest.raises(AssertionError):
            check_no_injection(built, parse(bad), top=True)

"""DKIM signatures (RFC 6376) for prepared messages, and which keys sign which message.

:func:`sign` makes one ``DKIM-Signature`` field per key, over the message as it will be
sent: ``c=relaxed/relaxed``, no ``l=`` (a body length would let anyone append content),
the signing key's fingerprint (``mailstrom_key_id=``, :meth:`DKIMKey.key_id`), ``t=``
always and ``x=`` when :attr:`DKIMConfig.expire` is set, counted from when the
message may first be sent (a message queued with ``send_at`` is signed at once but
delivered later). The signed header fields are those of :data:`SIGNED_HEADERS` that the
message has. Most are listed once more than they occur ("over-signed", RFC 6376 §8.15),
so that a second one added on the way (a second From, To or Date) breaks the signature
instead of being shown to the reader as the real one; these, but a Sender, are listed
even when absent (:data:`ALWAYS_OVERSIGNED`), so that nobody holding a signed message
can add a Reply-To that takes the answers, recipients the reader sees, or a Content-Type
or Content-Transfer-Encoding that changes how the body is read. What mailing lists add
to mail they pass on unchanged (List-* fields, a Sender) may be added without breaking
it.

The caller (``prepare``) makes the body 7-bit first, so no server along the way has a
reason to re-encode it; the signature then holds whether or not the receiver offers
8BITMIME. Not a body the message came signed with (its own signature would break):
a worker that re-encodes it for a server without 8BITMIME signs ours anew, or drops
them without our keys (:func:`resign_stale_top` with ``downgraded``).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Container, Sequence
from datetime import UTC, datetime, timedelta

from mailstrom.dkim.canon import FIELD_END, relaxed_body, relaxed_header, split_fields
from mailstrom.dkim.config import DKIMConfig as DKIMConfig  # re-exported
from mailstrom.dkim.keys import DKIMKey
from mailstrom.dkim.signature import DKIMAlgorithm
from mailstrom.dkim.signature import DKIMSignature as DKIMSignature  # re-exported
from mailstrom.status import DKIMStatus

SIGNED_HEADERS = (
    "from",
    "sender",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "feedback-id",
)
"""Header fields signed when present, in the order of the ``h=`` tag: those of RFC 6376
§5.4.1 that mailstrom's messages carry, and those providers read (RFC 8058, Feedback-ID)."""
NOT_OVERSIGNED = frozenset({"list-unsubscribe", "list-unsubscribe-post", "feedback-id"})
"""Listed as often as they occur; every other field of :data:`SIGNED_HEADERS` that the
message has is listed once more. A mailing list that passes the message on adds its own
List-Unsubscribe (RFC 2369), which should not break the signature."""
ALWAYS_OVERSIGNED = frozenset(SIGNED_HEADERS) - NOT_OVERSIGNED - {"sender"}
"""Listed in ``h=`` once more than they occur, even when absent (RFC 6376 §8.15, §5.4.2):
none can be added to the signed message. Each changes what the reader sees, where the
answer goes, or how the body is read: a raw message without MIME-Version, Content-Type
and Content-Transfer-Encoding is US-ASCII text (RFC 2045 §5.2), and one who adds
``Content-Type: text/html`` or ``Content-Transfer-Encoding: base64`` would show another
body under a valid signature. Not a Sender, which mailing lists add."""

_SIGNED = tuple(
    (
        name,
        name.encode("ascii"),
        name in ALWAYS_OVERSIGNED,
        0 if name in NOT_OVERSIGNED else 1,
    )
    for name in SIGNED_HEADERS
)
_FOLD_AT = 78
_B64_LINE = 72

RESIGN_BEFORE = timedelta(hours=1)
"""How long before its ``x=`` a signature is made anew as the message goes out
(:func:`resign_stale`): longer than the longest transaction the default timeouts
allow (some 20 minutes, RFC 5321 §4.5.3.2), with room for a receiver that verifies
after it queued the message."""
_SIGNATURE = b"DKIM-Signature:"
_RSA = DKIMAlgorithm.RSA_SHA256.value.encode("ascii")
"""How :func:`sign` begins each field it puts in front."""
_FWS = b" \t\r\n"
_KEY_ID = "mailstrom_key_id"
"""The tag :func:`sign` writes the signing key's fingerprint in (:meth:`DKIMKey.key_id`):
receivers ignore a tag they do not know (RFC 6376 §3.2), and :func:`resign_stale` tells
by it a signature by a key replaced since under the same selector and algorithm."""
_MADE = re.compile(
    rb"DKIM-Signature: v=1; a=([a-z0-9-]{1,32}); c=relaxed/relaxed;[ \t\r\n]{1,3}"
    rb"d=([^; \t\r\n]{1,255});[ \t\r\n]{1,3}s=([^; \t\r\n]{1,255});[ \t\r\n]{1,3}"
    rb"(?:mailstrom_key_id=([A-Za-z0-9_-]{8});[ \t\r\n]{1,3})?"
    rb"t=([0-9]{1,20});(?:[ \t\r\n]{1,3}x=([0-9]{1,20});)?"
    rb"[^\r]*(?:\r\n[ \t][^\r]*)*\r\n(?![ \t])"
)
"""A whole field :func:`sign` made (its tags in its order, folded where it folds them):
its ``a=``, ``d=``, ``s=``, key id (:data:`_KEY_ID`; absent from those made before it
was written), ``t=`` and ``x=``, and where it ends, in one match. Other fields' tags are
looked up one by one (:func:`_tag`)."""
_MADE_START = re.compile(rb"DKIM-Signature: v=1; a=[a-z0-9-]{1,32}; c=relaxed/relaxed;")
"""How each field :func:`sign` makes begins; :func:`unlike_ours` keeps a message's own
from beginning so."""
_VALUE = re.compile(rb"[ \t\r\n]*([^; \t\r\n]{1,255})")
"""A tag's value after its ``=``: up to the next ``;`` or FWS (``x=`` and ``d=`` hold
none), at most 255 octets (a domain name's limit; int() refuses some thousand digits)."""
_TAG_AT = {name: re.compile(rb"[;:][ \t\r\n]*" + name) for name in (b"d=", b"s=", b"a=", b"x=")}
"""Each tag :func:`_tag` looks up, where it begins a tag: after the colon or a semicolon
and FWS. Searched when the first occurrence of its name is not the tag."""
MAX_OTHER_SIGNATURES = 16
"""Signature fields below ours (the application's own, or a message's that
``send_email`` did not sign) looked at by :func:`resign_stale`; those further down go as
they came. A raw message may bring hundreds (a thousand fields and 1 MiB of header is
what ``prepare`` lets through), and every attempt would read each."""


def sign(
    data: bytes,
    keys: Sequence[DKIMKey],
    *,
    now: datetime,
    expire: timedelta | None = None,
    send_at: datetime | None = None,
) -> tuple[bytes, tuple[DKIMSignature, ...]]:
    """``data`` (a prepared message: CRLF line ends, a header section) with one
    ``DKIM-Signature`` field per key put in front, and what was signed.

    ``now`` is the signing time (``t=``); ``x=`` is ``expire`` after ``now`` or after
    ``send_at``, whichever is later. A naive time is taken as UTC, as ``prepare`` takes it.

    The same bytes must reach the receiver: sign last, after every change to the message.
    """
    blank = data.find(b"\r\n\r\n")
    if blank == -1:
        head, body = data if data.endswith(b"\r\n") else data + b"\r\n", b""
    else:
        head, body = data[: blank + 2], data[blank + 4 :]
    body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest()).decode("ascii")
    names, signed = _signed_headers(head)
    timestamp = _seconds(now)
    tags = [f"t={timestamp}"]
    if expire is not None:
        # A scheduled message leaves at send_at with these very bytes: an x= counted from
        # queueing would expire before its first attempt (RFC 6376 §3.5).
        first = timestamp if send_at is None else max(timestamp, _seconds(send_at))
        tags.append(f"x={first + max(1, int(expire.total_seconds()))}")
    fields: list[bytes] = []
    for key in keys:
        start = [
            "v=1",
            f"a={key.algorithm.value}",
            "c=relaxed/relaxed",
            f"d={key.domain}",
            f"s={key.selector}",
            f"{_KEY_ID}={key.key_id()}",
            *tags,
        ]
        unsigned = _fold_tags(start, names, body_hash)
        # RFC 6376 §3.7: the signature covers the signed fields, then this field itself
        # with an empty b= and without its final CRLF.
        canonical = signed + relaxed_header(unsigned.encode("ascii"))[:-2]
        value = base64.b64encode(key.sign(canonical)).decode("ascii")
        fields.append((unsigned + _fold_b64(value) + "\r\n").encode("ascii"))
    signatures = tuple(
        DKIMSignature(domain=k.domain, selector=k.selector, algorithm=k.algorithm) for k in keys
    )
    return b"".join(fields) + data, signatures


def unlike_ours(data: bytes) -> bytes:
    """``data`` (a message as ``send_email`` queues it, signed or not, DKIM configured
    or not: a worker may have keys when it sends it) with its top field, when a
    DKIM-Signature field begins as :func:`sign` begins its own (:data:`_MADE_START`),
    given a second space after the colon: the worker takes the
    fields on top in that layout, of one ``t=``, for ours (:func:`resign_stale`), and
    one a message brought (an application's, or forged: the layout is no secret) would
    have it sign the message with the keys of its ``d=``, any domain configured. The
    field says ``c=relaxed/``: its own signature canonicalises the space away (RFC 6376
    §3.4.2), as any relaxed one listing DKIM-Signature in ``h=`` does. Only the top
    field: one below it that is not in the layout ends the run taken for ours."""
    if data.startswith(_SIGNATURE) and _MADE_START.match(data):
        return _SIGNATURE + b" " + data[len(_SIGNATURE) :]
    return data


def resign_stale(
    data: bytes, dkim: DKIMConfig, *, now: datetime, before: timedelta = RESIGN_BEFORE
) -> tuple[bytes, DKIMStatus] | None:
    """``data`` (a message as stored: signed at ``send_email``) signed again now when a
    signature :func:`sign` put on top of it, of a domain ``dkim`` signs for, is stale. The
    keys that sign for a signature's ``d=`` are chosen as at ``send_email``: those of
    ``d=`` itself, else of its most specific parent with keys (its own removed, a
    parent's kept: :meth:`DKIMConfig.signing_domain`); of a ``d=`` without keys whose
    subdomain has some, those that sign its From domains below it, each one's (a
    parent's removed, subdomains' added: :meth:`DKIMConfig.domains_below`). A signature
    is stale when:

    - it expires (``x=``) before ``now + before``: no receiver may get a signature it must
      treat as invalid (RFC 6376 §3.5, §6.1.1), as a retry days later, a held message
      released or a long deferral would carry;
    - or none of the signatures those keys sign for is by one of them now: the keys
      were rotated away, or a subdomain's removed, while the message was queued (a
      scheduled one may wait for weeks), and their DNS records, once removed, would
      fail the signatures when the keys now configured could make valid ones; or one
      of ours is by a key no longer configured while its key domain has a key of its
      algorithm, beside a valid one of that algorithm too (that key rotated, the
      other's not; or a subdomain's keys removed, whose signatures ``send_email`` made
      with the parent's for another From domain): the stale one fails wherever its
      algorithm is verified. One of an algorithm the key domain has no key of any more
      stays beside a valid one (its record may still be published). One whose key id
      (:data:`_KEY_ID`) is not that of the key its ``d=``, ``s=`` and ``a=`` name now is
      by a key no longer configured: that key was replaced in place, the new public key
      published under its name. A key domain with
      an RSA key configured and no RSA signature by one is signed anew too (a receiver
      that verifies RSA alone would see it unsigned).

    None when none is, and none has expired, the case of almost every message: its
    signatures name the keys configured and expire later.

    The signatures on top that the keys of a stale one sign for go, and those keys sign
    in their place, with ``dkim.expire``: those by these keys, and those by keys rotated
    away. The application's own stays as it came, as when nothing is signed anew: one
    below ours (the fields one ``sign()`` put on top at ``send_email``, in its layout, of
    one ``t=``), even when every signature of its domain is by a key not configured now,
    or a selector of its own beside a signature by a key configured now, of its
    algorithm. (A message ``send_email`` did not sign, no key aligning with its From
    domains, has none of ours on top: none of its signatures is taken for ours, even
    when keys of their ``d=`` are configured now; ``prepare`` leaves no field of the
    message's own on top in ``sign()``'s layout: :func:`unlike_ours`. One of the
    message's naming a key configured now, its ``d=``, ``s=`` and ``a=``, is none of
    ours either: anyone can write one.) Of the other
    signatures (the first
    :data:`MAX_OTHER_SIGNATURES` below ours are looked at; further ones go as they
    came), those whose ``x=`` has passed by ``now`` go too: every receiver treats them
    as invalid,
    and nothing can sign them anew when no key of their domain is configured any more
    (all removed while the message waited); one without ``x=``, or not expired yet, stays
    as it is, as its DNS record may still be published (a signature that fails counts
    for no more than none at all, at DMARC). Returned with the bytes: the message's DKIM
    status as sent, the signatures they carry by the keys ``dkim`` has (their ``d=`` and
    ``s=``: those made now, then those kept; not the application's own of such a domain,
    by a selector of its own), as ``sign`` says it of those it makes; failing those, all
    the signatures kept, or why none is left.
    """
    found = resign_stale_top(data, dkim, now=now, before=before)
    return None if found is None else (found[0], found[1])


def resign_stale_top(
    data: bytes,
    dkim: DKIMConfig,
    *,
    now: datetime,
    before: timedelta = RESIGN_BEFORE,
    ours: int | None = None,
    downgraded: bool = False,
) -> tuple[bytes, DKIMStatus, int, int] | None:
    """:func:`resign_stale`, with how many octets at the start of ``data`` (the signature
    fields on top) the start of the bytes returned replaces: the rest, ``data[n:]``, ends
    them unchanged; and how many octets at the start of the bytes returned are fields of
    ours (those made now, then ours kept). What a worker keeps to send the same bytes
    again (:class:`~mailstrom.dkim.resigned.ResignedMessages`), which asks of them again
    with ``ours``: the fields in that many octets on top are ours, whatever their
    ``t=`` (those kept were made before), and no other is.

    ``downgraded``: ``data`` is the worker's 7-bit downgrade of the message, whose body
    no longer hashes as when ours were made. Every one of ours is stale: those of a
    key domain with keys now are made anew over these bytes, the others go, also when
    none is made. The status then names only those made now (any other signature was
    made over the 8-bit body and fails), or says why none is left. None when it has none
    of ours: a worker without keys (``dkim`` empty) asks too."""
    if not data.startswith(_SIGNATURE):
        return None
    deadline: int | None = None
    stamp: int | None = None
    # (start, end, d=, its key domain, s=, a=, by a key configured now) of each field: the
    # key domain is the one whose keys sign mail of d= now (None: no key of ours would),
    # as sign() at send_email would pick it; the signatures are named only when signing
    # anew.
    fields: list[tuple[int, int, str | None, str | None, bytes | None, bytes | None, bool]] = []
    # Key domains, each of them:
    domains: list[str] = []  # with a stale signature: theirs are made anew
    current_keys: dict[str, None] = {}  # with a signature by one of its keys configured now
    current_by: set[tuple[str, bytes]] = set()  # and the a= (lower-case) of each such one
    # With a signature of ours by a key no longer configured, and its a=, in the order
    # found:
    rotated: dict[tuple[str, bytes | None], None] = {}
    expired: set[int] = set()  # where a signature by no key configured now, x= past, is
    pending: list[int] = []  # fields of a d= without keys but with key domains below it
    # Ours are the fields on top that one sign() made at send_email: its layout, one t=.
    # Below them, the application's own (made before send_email) are never taken for
    # ours rotated away; none is ours when the top one is not sign()'s (send_email
    # signed nothing: no key aligned with the From domains; sign() has put its fields
    # in this layout since it first signed).
    made_at: bytes | None = None  # the t= of the top field, when sign() made it
    mine = True  # the field is one of ours
    ours_end = 0  # where the last of ours ends
    others = 0  # fields looked at that are not ours
    at = 0
    while data.startswith(_SIGNATURE, at):
        made = _MADE.match(data, at)
        if made is not None:  # sign()'s layout: its a=, d=, s=, t=, x= and end in one match
            algorithm, found, selector, key_id, signed_at, expiry = made.groups()
            end = made.end()
            if at == 0:
                made_at = signed_at
            elif made_at is not None and signed_at != made_at:
                mine = False
        else:
            mine = False
            end = _field_end(data, at)
            key_id = None
        if ours is not None:
            mine = at < ours
        if mine:
            ours_end = end
        else:
            if others == MAX_OTHER_SIGNATURES:
                break  # the rest go as they came
            others += 1
        if made is None:
            found, algorithm = _tag(data, b"d=", at, end), _tag(data, b"a=", at, end)
            selector, expiry = _tag(data, b"s=", at, end), _tag(data, b"x=", at, end)
        name = found.decode("ascii", "replace").lower() if found is not None else None
        current = dkim.key_names(name) if name is not None else frozenset()
        # A d= without keys of its own now (a subdomain's keys removed, its parent's
        # kept) is signed by its parent's: a signature of it is by no key configured now.
        owner = name
        if not current and name is not None and mine:
            owner = dkim.signing_domain(name)
            below = dkim.domains_below(name)
            # Its key domains are the From domains' (see _own_pending), or none. Ours are
            # on top, seen by now: when each key domain below has one, it is the
            # application's own, whatever the From domains.
            if below and (owner is not None or any(k not in current_keys for k in below)):
                pending.append(len(fields))
            elif below:
                owner = None
        if algorithm is not None:
            algorithm = algorithm.lower()
        # Only ours count as by a key configured now: a field the message brought naming
        # one of our keys (any can write one) would have its domain signed anew (its
        # x= near, no RSA signature beside it), though send_email did not sign for it.
        if (
            mine
            and current
            and name is not None
            and selector is not None
            and algorithm is not None
            and (configured := dkim.key_id(name, selector.lower(), algorithm)) is not None
            # A key replaced under its name (same selector and algorithm, the new public
            # key published there) made a signature that name no longer verifies. One
            # made before signatures carried the key id goes as it did: nothing tells.
            and (key_id is None or key_id == configured)
        ):
            fields.append((at, end, name, owner, selector, algorithm, True))
            current_keys[name] = None
            if algorithm is not None:
                current_by.add((name, algorithm))
            if name not in domains and expiry is not None and expiry.isdigit():
                if deadline is None:
                    deadline = _seconds(now) + int(before.total_seconds())
                if int(expiry) <= deadline:
                    domains.append(name)
        else:  # by no key configured now
            if not mine:  # the application's own: stays, and is no key rotated away
                owner = None
            fields.append((at, end, name, owner, selector, algorithm, False))
            if owner is not None and (not pending or pending[-1] != len(fields) - 1):
                rotated[owner, algorithm] = None
            if expiry is not None and expiry.isdigit():
                if stamp is None:
                    stamp = _seconds(now)
                if int(expiry) <= stamp:
                    expired.add(at)
        at = end
    if pending:
        _own_pending(data, at, dkim, fields, pending, current_keys, rotated)
    if downgraded:
        for start, _, _, owner, *_ in fields:
            if start < ours_end and owner is not None and owner not in domains:
                domains.append(owner)
    # A key domain with a signature of ours by a key rotated away is signed anew.
    for name, algorithm in rotated:
        if name not in domains and _stale(dkim, current_keys, name, algorithm):
            domains.append(name)
    # Or when none of its RSA signatures is while it has an RSA key (one added, say).
    # Many receivers verify RSA alone (RFC 8301 obliges them to it, RFC 8463 to
    # nothing), and the mail reached them with none: unsigned, to DMARC.
    domains += [
        name
        for name in current_keys
        if (name, _RSA) not in current_by and name not in domains and dkim.has_rsa(name)
    ]
    # Ours over the 8-bit body fail: they go even when no key domain of theirs has keys.
    # None of ours, the re-encoding changes nothing of ours (the rest was looked at as
    # stored), and a worker without keys asks too.
    if downgraded:
        if not ours_end:
            return None
    elif not domains and not expired:
        return None
    # A domain's signatures by its keys go, and by keys rotated away; the application's
    # own (beside one of ours by a key configured now, of its algorithm) stays as it came,
    # as it stays when nothing is signed anew: re-signing for an x= near must not take it.
    kept = [
        field
        for field in fields
        if field[0] not in expired
        and not (downgraded and field[0] < ours_end)
        and not (
            field[3] in domains and (field[6] or _stale(dkim, current_keys, field[3], field[5]))
        )
    ]
    rest = b"".join(data[start:end] for start, end, *_ in kept) + data[at:]
    signed, signatures = (
        sign(rest, dkim.keys_for(domains), now=now, expire=dkim.expire) if domains else (rest, ())
    )
    # Ours kept come first among those kept, as on top of data.
    mine_octets = len(signed) - len(rest)
    mine_octets += sum(end - start for start, end, *_ in kept if start < ours_end)
    # Ours kept are those by a key configured now (its d= and s=): the application's own
    # of the same domain, by a selector of its own, is kept but is not ours.
    named: list[DKIMSignature] = []
    ours_named = list(signatures)
    for _, _, name, _, selector, algorithm, by_current in kept:
        signature = _named(name, selector, algorithm)
        if signature is not None:
            named.append(signature)
            if by_current:
                ours_named.append(signature)
    if downgraded and ours_end:
        if ours_named:
            return signed, DKIMStatus(signatures=tuple(ours_named)), at, mine_octets
        lost = sorted({name for start, _, name, *_ in fields if start < ours_end and name})
        reason = "the 7-bit re-encoding for a server without 8BITMIME broke its signatures"
        reason += f" and no key of {', '.join(lost)} is configured now" if lost else ""
        return signed, DKIMStatus(reason=reason), at, mine_octets
    if ours_named or named:
        return signed, DKIMStatus(signatures=tuple(ours_named or named)), at, mine_octets
    # Named only when it has no key now: one that has, whose expired signature was not
    # ours (the message's own, of a domain mailstrom signs for too), is not gone.
    gone = sorted(
        {
            name
            for start, _, name, *_ in fields
            if start in expired and name and not dkim.key_names(name)
        }
    )
    reason = "its signatures had expired (x=)"
    if gone:
        reason += f" and no key of {', '.join(gone)} is configured now"
    return signed, DKIMStatus(reason=reason), at, mine_octets


def _own_pending(
    data: bytes,
    at: int,
    dkim: DKIMConfig,
    fields: list[tuple[int, int, str | None, str | None, bytes | None, bytes | None, bool]],
    pending: list[int],
    current_keys: Container[str],
    rotated: dict[tuple[str, bytes | None], None],
) -> None:
    """The key domain of each of the ``pending`` ``fields`` of :func:`resign_stale_top`:
    signatures by no key configured now, of a ``d=`` without keys whose subdomains have
    some. Mail from ``news.example.com`` was signed by ``example.com``'s keys while only
    they were configured; theirs removed and ``news.example.com``'s added since, the keys
    that sign it now are those (as :func:`sign` picks them at ``send_email``, by the From
    domains), not none. Which subdomains', the From field of ``data`` (its header after
    the signature fields, from ``at``) says: the key domains of its domains below ``d=``
    (a From of ``news.example.com`` and ``shop.example.com`` is signed by both's keys).
    Those without a signature by a key configured now sign in its place. When every one
    has such a signature, the one of ``d=`` is the application's own, and stays: ours of
    those domains were made by their keys, not by ``d=``'s (the most specific)."""
    froms: tuple[str, ...] | None = None
    for index in pending:
        start, end, name, owner, selector, algorithm, by_current = fields[index]
        assert name is not None  # pending only with a d=
        if froms is None:
            # Loaded here: a signature of a parent beside a subdomain with keys is rare.
            from mailstrom.message.envelope import from_domains_of

            blank = data.find(b"\r\n\r\n", at)
            froms = from_domains_of(data[at : len(data) if blank == -1 else blank + 4])
        suffix = "." + name
        unsigned: list[str] = []  # key domains of From domains under d=, none of ours on top
        signed = False  # and whether one has one
        for domain in froms:
            if domain == name or domain.endswith(suffix):
                key_domain = dkim.signing_domain(domain)
                if key_domain is not None and key_domain in current_keys:
                    signed = True
                elif key_domain is not None and key_domain not in unsigned:
                    unsigned.append(key_domain)
        if unsigned:
            owner = unsigned[0]
        elif signed or any(k in current_keys for k in dkim.domains_below(name)):
            owner = None
        fields[index] = (start, end, name, owner, selector, algorithm, by_current)
        for key_domain in unsigned or (() if owner is None else (owner,)):
            rotated[key_domain, algorithm] = None


def _stale(
    dkim: DKIMConfig,
    current_keys: Container[str],
    owner: str | None,
    algorithm: bytes | None,
) -> bool:
    """Whether a signature of ours (made by ``sign()`` at ``send_email``) by no key
    configured now, of key domain ``owner`` (the key domain signs it now), was made by
    a key rotated away and is made anew: ``current_keys`` are the key domains with a
    signature by a key configured now."""
    # Rotated away when no signature of the domain is by a key configured now. Or when
    # it is of an algorithm the domain has a key of: that key rotated (a selector of
    # that algorithm replaced, a subdomain's keys removed and its parent's signing it
    # now), the valid ones being enough to pass while the stale one fails wherever its
    # algorithm is verified (in DMARC reports too). One of an algorithm the domain has
    # no key of any more stays: its record may still be published, and nothing would
    # sign in its place.
    return owner is not None and (
        owner not in current_keys
        or (
            algorithm is not None and algorithm.decode("ascii", "replace") in dkim.algorithms(owner)
        )
    )


def _named(
    domain: str | None, selector: bytes | None, algorithm: bytes | None
) -> DKIMSignature | None:
    """The signature these tag values name; None when one is missing or unknown."""
    if domain is None or selector is None or algorithm is None:
        return None
    try:
        named = DKIMAlgorithm(algorithm.decode("ascii", "replace"))
    except ValueError:
        return None
    return DKIMSignature(
        domain=domain, selector=selector.decode("ascii", "replace"), algorithm=named
    )


def _field_end(data: bytes, start: int) -> int:
    """Where the header field beginning at ``start`` ends, after its CRLF."""
    found = FIELD_END.search(data, start)
    return len(data) if found is None else found.start() + 2


def _tag(data: bytes, name: bytes, start: int, end: int) -> bytes | None:
    """The value of the tag ``name`` (``b"x="``) of the DKIM-Signature field
    ``data[start:end]``, or None. Taken where only FWS lies between it and the colon or
    semicolon before it: ``x=`` inside a base64 value follows a letter or digit. The
    first occurrence is looked at by ``bytes.find`` and a step or two back (a regular
    expression starting with a character class scanned the field some ten times slower;
    this runs for every signed message sent); when it is not the tag, the field is
    searched by :data:`_TAG_AT` (in C: a loop over every occurrence took a hostile field
    of names packed in values, or of long FWS, an octet at a time)."""
    at = data.find(name, start, end)
    if at == -1:
        return None
    before = at - 1
    while before > start and data[before] in _FWS and before > at - 4:
        before -= 1
    if data[before] not in b";:":
        found = _TAG_AT[name].search(data, start, end)
        if found is None:
            return None
        at = found.end() - len(name)
    value = _VALUE.match(data, at + len(name), end)
    return None if value is None else value[1]


def _seconds(when: datetime) -> int:
    """``when`` as a Unix time; naive is UTC (``datetime.timestamp`` would take it as
    local time, putting t= in the future west of UTC and x= early east of it)."""
    return int((when if when.tzinfo is not None else when.replace(tzinfo=UTC)).timestamp())


def _signed_headers(head: bytes) -> tuple[list[str], bytes]:
    """(the ``h=`` names, the canonicalised fields they select, in that order)."""
    by_name: dict[bytes, list[bytes]] = {}
    for field_name, raw in split_fields(head):
        found = by_name.get(field_name)
        if found is None:
            by_name[field_name] = [raw]
        else:
            found.append(raw)
    names: list[str] = []
    signed: list[bytes] = []
    for name, key, always, extra in _SIGNED:
        present = by_name.get(key)
        if present is None:
            if always:
                # Absent, listed once: a field of this name added later, anywhere, is
                # selected by it and breaks the signature (RFC 6376 §8.15).
                names.append(name)
            continue
        # Several fields of one name are taken from the bottom up (RFC 6376 §5.4.2); the
        # over-signed listing beyond them selects nothing here, and selects any field of
        # that name added later, so that the signature no longer verifies.
        names.extend([name] * (len(present) + extra))
        signed.extend(relaxed_header(raw) for raw in reversed(present))
    return names, b"".join(signed)


def _fold_tags(tags: list[str], names: list[str], body_hash: str) -> str:
    """``DKIM-Signature: v=1; ...; bh=...;`` folded near 78 columns, ending with
    ``b=`` (the signature goes right after it)."""
    lines: list[str] = []
    line = "DKIM-Signature:"
    for tag in tags:
        item = f"{tag};"
        if len(line) + 1 + len(item) > _FOLD_AT:
            lines.append(line)
            line = ""
        line += " " + item
    # h= is folded between names when long: FWS may surround its colons (RFC 6376 §3.5).
    pieces = [f"{name}:" for name in names]
    pieces[-1] = pieces[-1][:-1] + ";"
    pieces[0] = "h=" + pieces[0]
    for index, piece in enumerate(pieces):
        if len(line) + (1 if index == 0 else 0) + len(piece) > _FOLD_AT:
            lines.append(line)
            line = " " + piece
        else:
            line += (" " if index == 0 else "") + piece
    lines.append(line)
    lines.append(f" bh={body_hash};")
    lines.append(" b=")
    return "\r\n".join(lines)


def _fold_b64(value: str) -> str:
    """The b= value in lines of at most 72 characters (FWS inside it is ignored, RFC 6376
    §3.5); the first piece follows ``b=`` directly so that removing the value leaves the
    field exactly as it was signed."""
    first = _B64_LINE - 3
    parts = [value[:first]]
    parts.extend(value[i : i + _B64_LINE] for i in range(first, len(value), _B64_LINE))
    return "\r\n ".join(parts)

"""Header fields that mailbox providers ask of bulk senders, built from :class:`Email`
fields and checked before anything is queued.

- ``List-Unsubscribe`` (RFC 2369) with an https URL and/or a mailto URI, both in one
  field when both are given; with the https URL also ``List-Unsubscribe-Post:
  List-Unsubscribe=One-Click`` (RFC 8058), which lets the provider unsubscribe the
  reader with one POST. RFC 8058 §4 requires a DKIM signature covering both fields;
  mailstrom's signatures do.
- ``Feedback-ID``: an identifier the provider reports complaint rates by (Gmail's
  ``campaign:customer:type:sender`` form, for instance).
- ``Auto-Submitted`` (RFC 3834 §5): ``auto-generated``, ``auto-replied`` or
  ``auto-notified``, which tells vacation responders and other robots not to answer.

Every value is written as given, never re-encoded: a URI is refused (not rewritten) when
it holds a character RFC 3986 does not allow, and an identifier when it holds white space.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote, urlsplit

from mailstrom.errors import HeaderTooLong, InvalidAddress, InvalidHeaderValue
from mailstrom.message.addrspec import validate_address
from mailstrom.message.chars import check_header_text, shorten

MAX_URI = 900
"""Longest unsubscribe URI, in octets: with ``List-Unsubscribe: <``…``>,`` around it, it
still fits one 998-octet line (RFC 5322 §2.1.1), since a URI cannot be folded."""
MAX_FEEDBACK_ID = 256
"""Longest Feedback-ID, in octets."""
AUTO_SUBMITTED = ("auto-generated", "auto-replied", "auto-notified")
"""The Auto-Submitted keywords accepted (RFC 3834 §5; auto-notified: RFC 5436 §2.7)."""

# RFC 3986 §2: unreserved, reserved and the percent sign; nothing else may appear in a URI.
_URI_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_TOKEN = re.compile(r"[!-~]+")


def provider_fields(
    *,
    unsubscribe_url: str | None,
    unsubscribe_mailto: str | None,
    feedback_id: str | None,
    auto_submitted: str | None,
) -> tuple[str, ...]:
    """The header fields (``Name: value``, folded, without CRLF) for the given values.

    Raises :class:`HeaderInjection` for CR/LF, :class:`ForbiddenCharacter` for other
    controls, :class:`HeaderTooLong` past the length limits and
    :class:`InvalidHeaderValue` for the rest (a URI that is not https or mailto, a
    keyword RFC 3834 does not know, white space in a Feedback-ID).
    """
    fields: list[str] = []
    uris: list[str] = []
    if unsubscribe_url is not None:
        uris.append(_https(unsubscribe_url))
    if unsubscribe_mailto is not None:
        uris.append(_mailto(unsubscribe_mailto))
    if uris:
        items = [f"<{uri}>" for uri in uris]
        # Each URI on a line of its own when they do not fit one: a fold may only go
        # between them (inside a URI it would become part of it).
        field = "List-Unsubscribe: " + ", ".join(items)
        if len(field) > 78:
            field = "List-Unsubscribe: " + ",\r\n ".join(items)
        fields.append(field)
    if unsubscribe_url is not None:
        fields.append("List-Unsubscribe-Post: List-Unsubscribe=One-Click")
    if feedback_id is not None:
        fields.append(f"Feedback-ID: {_feedback_id(feedback_id)}")
    if auto_submitted is not None:
        fields.append(f"Auto-Submitted: {_auto_submitted(auto_submitted)}")
    return tuple(fields)


def _text(header: str, field: str, value: object, limit: int) -> str:
    if not isinstance(value, str):
        raise InvalidHeaderValue(
            f"{field} must be a str, not {type(value).__name__}", header=header
        )
    check_header_text(field, value)
    size = len(value.encode("utf-8"))
    if size > limit:
        raise HeaderTooLong(
            f"{field} is {size} octets long; the limit is {limit}",
            header=header,
            size=size,
            limit=limit,
        )
    value = value.strip(" \t")
    if not value:
        raise InvalidHeaderValue(f"{field} is empty", header=header)
    return value


def _check_uri(field: str, uri: str) -> None:
    if not uri.isascii():
        raise InvalidHeaderValue(
            f"{field} {shorten(uri)} holds non-ASCII characters; percent-encode them "
            "(RFC 3986 §2.1)",
            header="List-Unsubscribe",
        )
    if not _URI_CHARS.fullmatch(uri) or _BAD_PERCENT.search(uri):
        raise InvalidHeaderValue(
            f"{field} {shorten(uri)} is not a valid URI: it holds white space, '<', '>', "
            "'\"' or another character RFC 3986 does not allow, or a '%' not followed by "
            "two hex digits",
            header="List-Unsubscribe",
        )


def _https(value: str) -> str:
    url = _text("List-Unsubscribe", "unsubscribe_url", value, MAX_URI)
    _check_uri("unsubscribe_url", url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises for a port that is no number from 0 to 65535)
    except ValueError as exc:  # an unpaired bracket: "Invalid IPv6 URL"
        raise InvalidHeaderValue(
            f"unsubscribe_url {shorten(url)} is not a valid URL: {exc}",
            header="List-Unsubscribe",
        ) from None
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise InvalidHeaderValue(
            f"unsubscribe_url {shorten(url)} must be an https:// URL with a host: one-click "
            "unsubscription (RFC 8058 §3.1) is an HTTPS POST, and mailto goes in "
            "unsubscribe_mailto",
            header="List-Unsubscribe",
        )
    return url


def _mailto(value: str) -> str:
    text = _text("List-Unsubscribe", "unsubscribe_mailto", value, MAX_URI)
    if text[:7].lower() == "mailto:":
        _check_uri("unsubscribe_mailto", text)
        address = unquote(text[7:].partition("?")[0])
        uri = text
    else:
        address, uri = text, ""
    try:
        valid = validate_address(address)
    except InvalidAddress as exc:
        raise InvalidHeaderValue(
            f"unsubscribe_mailto {shorten(text)} does not name one valid address: {exc.reason}",
            header="List-Unsubscribe",
        ) from None
    if uri:
        return uri
    if valid.smtputf8:
        raise InvalidHeaderValue(
            f"unsubscribe_mailto {shorten(text)} has a non-ASCII local part; give it as a "
            "mailto: URI with the local part percent-encoded (RFC 6068 §2)",
            header="List-Unsubscribe",
        )
    local, _, domain = valid.envelope.rpartition("@")
    # RFC 6068 §2: what a URI would read otherwise is percent-encoded ("?" starts its
    # header fields, "#" its fragment, "%" an escape; "{", "|", a quoted local part's
    # '"' and space may not stand in one at all), and so is "/", a gen-delim, which §2
    # has percent-encoded as well. Other delimiters (sub-delims, ":") are left as they
    # are: a client that does not decode the address still reads it right. A domain literal's
    # brackets are gen-delims, which §2 has percent-encoded ("[" and "]", as "/" and "?"):
    # of a domain only its letters, digits, "-._~" and an address literal's ":" stay.
    uri = f"mailto:{quote(local, safe=_MAILTO_SAFE)}@{quote(domain, safe=':')}"
    _check_uri("unsubscribe_mailto", uri)
    return uri


_MAILTO_SAFE = "!$&'()*+,;=:"
"""Characters of a local part left as they are in a mailto URI (with letters, digits and
``-._~``): the ones RFC 3986 allows in a URI that do not end or escape its address, but
the gen-delims RFC 6068 §2 has percent-encoded (``/``; ``?``, ``#``, ``[``, ``]``)."""


def _feedback_id(value: str) -> str:
    text = _text("Feedback-ID", "feedback_id", value, MAX_FEEDBACK_ID)
    if not _TOKEN.fullmatch(text):
        raise InvalidHeaderValue(
            f"feedback_id {shorten(text)} must be printable ASCII without spaces, such as "
            "campaign:customer:type:sender",
            header="Feedback-ID",
        )
    return text


def _auto_submitted(value: str) -> str:
    text = _text("Auto-Submitted", "auto_submitted", value, 64).lower()
    if text not in AUTO_SUBMITTED:
        raise InvalidHeaderValue(
            f"auto_submitted must be one of {', '.join(AUTO_SUBMITTED)} (RFC 3834 §5), "
            f"got {shorten(value)}",
            header="Auto-Submitted",
        )
    return text

"""pyspf's reading of an SPF domain-spec and its macros (RFC 7208 §7), in linear work.

Some of pyspf's steps take time growing as the square of the text they read, and the
text is whatever a record's publisher wrote, up to the 64 KiB a DNS answer holds:

* its check that a domain-spec ends in a toplabel (``RE_TOPLAB``) backtracks over a
  long label: ``a:x.aaa…a_`` with a 16,000-character label took 6 s of CPU, four times
  as long for each doubling;
* its macro expansion searches the whole text for a malformed macro once for each
  dot-separated label in it: ``exists:%{d}.a.a.a…`` of 16,000 characters took 4 s;
* both search each ``%{`` as far as the next ``}``, and with none left, to the end.

The doctor's time limits bound its DNS, not this CPU: one such record (the domain's, or
one it includes) held a run for minutes. :class:`~mailstrom.doctor.spf` evaluates with
these functions in place of pyspf's own, which give the same results and errors, but for
an expansion longer than a domain name: it is truncated as RFC 7208 §7.3 says
(:func:`_fitted`), where pyspf removes one label only.
"""

from __future__ import annotations

import itertools
import re
import urllib.parse
from typing import Any

_DOMAIN_END = re.compile(
    r"\.(?:[0-9]*+[a-z][0-9a-z]*+|[0-9a-z]++-[0-9a-z-]*+(?<=[0-9a-z]))\.?$"
    r"|%(%|_|-|(\{[^\}]*\}))",
    re.IGNORECASE,
)
"""pyspf's ``RE_TOPLAB`` (a toplabel at the end, or a macro), matching the same text,
its repetitions possessive: a run of letters and digits is taken whole, as nothing but
``.`` or the end may follow it, and is not given back one character at a time."""

_DOMAIN_END_UNCLOSED = re.compile(
    r"\.(?:[0-9]*+[a-z][0-9a-z]*+|[0-9a-z]++-[0-9a-z-]*+(?<=[0-9a-z]))\.?$|%[%_-]",
    re.IGNORECASE,
)
""":data:`_DOMAIN_END` for text with no ``}``: no ``%{…}`` macro can match there."""
_ESCAPE = re.compile(r"%[%_-]")
"""pyspf's ``RE_CHAR`` for text with no ``}``."""
_ESCAPES = {"%%": "%", "%_": " ", "%-": "%20"}

# Both patterns find a macro "%{" as far as the next "}": after the text's last "}", each
# "%{" was a search to the end that failed, time growing as the square of their number
# ("%{%{%{…", 1.7 s for 30,000). No match before that "}" reaches past it (its character
# ends a macro and is in no toplabel), none after it can be a "%{…}" macro: the text is
# searched in two parts, up to the last "}" and after it without that alternative.


def check_domain_end(spf: Any, arg: str) -> None:
    """pyspf's permerror for a domain-spec that does not end in a toplabel or a macro
    (RFC 7208 §7.1, ``domain-end``): the text after the last match must be empty."""
    closed = arg.rfind("}") + 1
    if closed == len(arg):
        left = _DOMAIN_END.split(arg)[-1]
    else:  # what follows the last match, which is in the unclosed part when there is one
        left = _DOMAIN_END_UNCLOSED.split(arg[closed:])[-1]
    if left:
        raise spf.PermError("Invalid domain found (use FQDN)", arg)


def expanded(spf: Any, query: Any, text: str, stripdot: bool) -> str:
    """``text`` with its macros expanded for ``query``, as pyspf's ``query.expand``
    expands them (the same text, the same PermError), the malformed-macro search made
    once rather than once per label."""
    if "%" in text and spf.RE_INVALID_MACRO.search(text):
        raise spf.PermError("invalid-macro-char ", text.partition(".")[0])
    pieces: list[str] = []
    end = 0
    closed = text.rfind("}") + 1
    macros = itertools.chain(spf.RE_CHAR.finditer(text, 0, closed), _ESCAPE.finditer(text, closed))
    for found in macros:
        pieces.append(text[end : found.start()])
        end = found.end()
        macro = found[0]
        if macro in _ESCAPES:
            pieces.append(_ESCAPES[macro])
            continue
        letter = macro[2].lower()
        if letter == "p":
            query.getp()  # the validated PTR name, looked up when first asked for
        elif letter in "crt" and stripdot:
            raise spf.PermError("c,r,t macros allowed in exp= text only", macro)
        value = getattr(query, letter, query)
        if not value:
            continue
        if value is query:
            raise spf.PermError("Unknown Macro Encountered", macro)
        piece = spf.expand_one(value, macro[3:-1], spf.JOINERS.get(letter))
        if letter != macro[2]:  # an upper-case letter asks for URL escaping
            piece = urllib.parse.quote(piece, "~")
        pieces.append(piece)
    pieces.append(text[end:])
    result = "".join(pieces)
    if stripdot and result.endswith("."):
        result = result[:-1]
    if "." in result and len(result) > MOST_NAME:
        result = _fitted(result)
    return result


MOST_NAME = 253
"""Characters of a domain name in text form at most (RFC 7208 §7.3)."""


def _fitted(name: str) -> str:
    """``name`` truncated on the left to fit :data:`MOST_NAME` characters, "by removing
    successive domain labels (and their following dots)" (RFC 7208 §7.3); the last label
    alone when it is longer (a name no lookup finds).

    pyspf removes one label only: an expansion still too long was no name DNS can hold,
    its lookup found nothing, and ``exists:%{ir}.%{v}._spf.%{d}`` failed an IPv6 address
    of a long domain that receivers which truncate as the RFC says pass. The labels go
    in one search from the end, not one at a time (a 64 KiB text holds some 30,000)."""
    cut = name.find(".", len(name) - MOST_NAME - 1)
    if cut == -1:
        cut = name.rfind(".")
    return name[cut + 1 :]

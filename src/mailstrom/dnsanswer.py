"""Whether an answer dnspython hands on holds the whole record set: a truncated one does not.

dnspython asks again over TCP after a truncated UDP answer (the TC bit), and hands on a
TCP answer that is truncated too as it came: without records as ``NoAnswer``, with some
as an answer. Either holds some of the records at most (longer than the 64 KiB a TCP
message holds, or a broken server or middlebox cut it), and RFC 2181 §9 says to ignore
it. Taken whole, a route went to one of a domain's MX hosts, DANE matched against part
of a TLSA set, MTA-STS and the doctor read part of a TXT set. Every lookup takes it as
``NoAnswer`` (:func:`whole`), which each asks
:func:`~mailstrom.routing.lookup.unanswered` about: a failed lookup, as for SERVFAIL.

A leaf module (it imports nothing of mailstrom), for the resolvers and their callers.
"""

from __future__ import annotations

import dns.flags
import dns.message
import dns.resolver

TRUNCATED = (
    "the DNS server's answer was truncated (TC bit) over TCP too: it holds some of the "
    "records at most"
)
"""What a lookup given a truncated answer fails with."""


def is_truncated(response: object) -> bool:
    """Whether ``response`` (a DNS message) has the TC bit: some of its records at most."""
    return isinstance(response, dns.message.Message) and bool(response.flags & dns.flags.TC)


def whole(answer: dns.resolver.Answer) -> dns.resolver.Answer:
    """``answer``, unless its response is truncated: then ``NoAnswer`` for that response,
    as dnspython raises it for one truncated without records."""
    if is_truncated(answer.response):
        raise dns.resolver.NoAnswer(response=answer.response)  # type: ignore[no-untyped-call]
    return answer

"""Sending a TLS report where the policy domain asked (RFC 8460 §5): by mail, as a
``multipart/report`` message with the gzipped JSON attached (queued like any other mail,
so it is retried and signed like the rest), or by an HTTPS POST of the gzipped JSON.

A POST goes where the policy domain's DNS says, so it is made as the MTA-STS policy fetch
is (:mod:`mailstrom.mtasts.https`): to an address mailstrom looked up and admits, never
to this host, its link or a private network, and within one deadline.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import dns.asyncresolver

from mailstrom.domains import ldh_domain_name
from mailstrom.errors import LocalResourceShortage, PermanentFailure, TemporaryFailure
from mailstrom.message.addresses import parse_mailbox
from mailstrom.message.addrspec import validate_address
from mailstrom.message.chars import shorten
from mailstrom.mtasts import https
from mailstrom.routing import RoutePolicy, Router
from mailstrom.tlsrpt.report import MEDIA_TYPE, Report

POST_TIMEOUT = 30.0
"""Seconds one POST may take in all, by default: the host's lookup, connecting, TLS,
sending the report and the answer's head (its body is never read)."""

MAX_POSTS = 8
"""POSTs :func:`post_reports` has in flight at once. Each collector is the policy domain's
choice, and one that takes the connection and never answers costs its POST's whole
deadline: N of them one after another held a daily run N times 30 s (100 domains, 50 minutes,
into the next run). Eight at a time make that about N / 8 deadlines, while the run stays
a handful of connections, nothing like a burst at anyone's network."""


class PostProblem(str):
    """Why a POST of :func:`post_report` failed (the text), and whether it failed for
    good: ``permanent`` when the URL or its collector refuses the report however often it
    is tried (no valid https URL, only refused addresses, a 4xx answer but 408 and 429),
    so that it is the policy domain's to fix; else a later try may succeed (no answer, a
    failed lookup or connection, a 5xx)."""

    permanent: bool

    def __new__(cls, text: str, *, permanent: bool = False) -> PostProblem:
        problem = super().__new__(cls, text)
        problem.permanent = permanent
        return problem


def report_message(report: Report, *, sender: str, to: str, submitter: str) -> EmailMessage:
    """The mail carrying ``report`` to ``to`` (RFC 8460 §5.3: subject, the
    ``TLS-Report-Domain``/``TLS-Report-Submitter`` fields, ``multipart/report`` with
    ``report-type="tlsrpt"``; and ``TLS-Required: No``, RFC 8460 §3). ``to`` comes from
    the policy domain's DNS: one that is no addr-spec raises
    :class:`~mailstrom.errors.InvalidAddress`; so does a ``sender`` (the operator's
    ``tlsrpt.from``, else ``tlsrpt.contact``) that is no mailbox, and one with a control
    character raises its :class:`~mailstrom.errors.InvalidMessage`."""
    # Checked before the email package sees them, which raises IndexError for "a@" and
    # ValueError for a CR LF.
    recipient = validate_address(to).header
    parse_mailbox("From", sender)
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = recipient
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = make_msgid(domain=submitter)
    msg["Subject"] = (
        f"Report Domain: {report.policy_domain} Submitter: {submitter} "
        f"Report-ID: <{report.report_id}>"
    )
    msg["TLS-Report-Domain"] = report.policy_domain
    msg["TLS-Report-Submitter"] = submitter
    msg["Auto-Submitted"] = "auto-generated"
    # RFC 8460 §3: a mailed report MUST be delivered despite any TLS-related failure (it
    # is how the domain learns of one), in the clear if need be. RFC 8689 §5's field has
    # the worker skip the domain's MTA-STS and DANE policies for it.
    msg["TLS-Required"] = "No"
    msg.set_content(
        f"This is an aggregate TLS report from {submitter} for {report.policy_domain} "
        f"covering {report.day.isoformat()} (UTC), as RFC 8460 describes.\n"
    )
    maintype, _, subtype = MEDIA_TYPE.partition("/")
    msg.add_attachment(
        report.gzipped(),
        maintype=maintype,
        subtype=subtype,
        filename=report.filename(submitter, gz=True),
    )
    # add_attachment made it multipart/mixed; the type changes, the boundary stays.
    msg.set_type("multipart/report")
    msg.set_param("report-type", "tlsrpt")
    return msg


async def mail_refusal(domain: str, router: Router, *, allow_loopback: bool) -> PostProblem | None:
    """Why a report is not to be mailed to an address at ``domain`` (a ``mailto:`` URI's,
    which the policy domain's DNS chose), or None: the route the worker's ``router``
    finds for it holds an address a POST would be refused (:func:`post_report`: this
    host, its link, a private network or another that is not globally reachable, unless
    ``allow_loopback``), or it has none (for good), or its lookup failed (for now). The
    worker delivers to MX hosts on a private network, as internal relays are; but such
    a host, for a domain that is not the operator's, is the operator's own network
    reached by a remote domain's choice."""
    try:
        route = await router.route(domain)
    except PermanentFailure as exc:
        return PostProblem(f"not queued: {exc}", permanent=True)
    except TemporaryFailure as exc:
        return PostProblem(f"not queued: {exc}")
    policy = RoutePolicy(allow_loopback=allow_loopback, refuse_private=True)
    refused = [f"{ip} ({kind})" for ip in route.addresses if (kind := policy.refused(ip))]
    if not refused:
        return None
    more = f" and {len(refused) - 3} more" if len(refused) > 3 else ""
    text = f"not queued: {domain} routes mail to refused addresses: {', '.join(refused[:3])}{more}"
    return PostProblem(text, permanent=True)


async def post_report(
    report: Report,
    url: str,
    *,
    resolver: dns.asyncresolver.Resolver,
    allow_loopback: bool = False,
    context: ssl.SSLContext | None = None,
    timeout: float = POST_TIMEOUT,
    source_address: str | None = None,
) -> PostProblem | None:
    """POST ``report`` (gzipped) to the https ``url``; None when the endpoint answered
    2xx, else why not (a :class:`PostProblem`, which says whether it failed for good).
    Redirects are not followed (RFC 8460 §5.4 asks for a 2xx), and the answer's body is
    never read: only its status counts.

    ``url`` comes from the policy domain's DNS, so it may point anywhere: a host that is
    neither an address nor a host name (letters, digits, inner hyphens) is refused; the
    host's addresses come from ``resolver``, and loopback, link-local, private and other
    not globally reachable ones
    (see :data:`~mailstrom.routing.policy.NOT_GLOBAL_NETWORKS`) are refused unless
    ``allow_loopback`` (for tests), multicast and reserved ones always. Looking up the
    name, connecting, TLS, sending and the answer's head take ``timeout`` seconds in all.
    An address where connecting or TLS stalls is given up before that (see
    :data:`~mailstrom.mtasts.https.CONNECT_SHARE`) and the host's next one gets the time
    left; once the report is sent, no other address is tried (it would count twice).
    The certificate is checked against ``context``, else the system's trust store.
    Connections are bound to ``source_address`` (``Config.source_address``) when given,
    and only the host's addresses of its IP version are tried.
    """
    import httpx  # the mta-sts extra; checked by the caller

    try:
        host, port, path = _target(url)
    except (httpx.InvalidURL, UnicodeError, ValueError) as exc:
        # The URL comes from DNS: one httpx cannot parse ("https://xn--/") is the record's
        # problem, not a crash of the command.
        text = f"invalid URL: {type(exc).__name__}: {https.quoted(exc)}"
        return PostProblem(text, permanent=True)
    route_policy = https.route_policy_for(
        allow_loopback=allow_loopback, source_address=source_address
    )
    try:
        async with asyncio.timeout(timeout) as deadline:
            addresses = await https.usable_addresses(resolver, host, route_policy)
            return await _post_to_one_of(
                addresses, report, host, port, path, context, timeout, deadline, source_address
            )
    except https.NoUsableAddress as exc:
        return PostProblem(f"not posted: {exc}", permanent=not exc.temporary)
    except LocalResourceShortage as exc:
        # The system's CAs not read for want of a descriptor (EMFILE): this report is not
        # posted now, and is tried again later, as after a failed connection; let out,
        # it ended the run before what was posted was noted, to be posted again.
        return PostProblem(f"not posted: {exc}")
    except TimeoutError:
        text = f"no answer within {timeout:g} s (lookup, connection, request and answer head)"
        return PostProblem(text)


async def post_reports(
    posts: Sequence[tuple[Report, str]],
    *,
    resolver: dns.asyncresolver.Resolver,
    allow_loopback: bool = False,
    context: ssl.SSLContext | None = None,
    timeout: float = POST_TIMEOUT,
    at_once: int = MAX_POSTS,
    source_address: str | None = None,
) -> list[PostProblem | None]:
    """:func:`post_report` for each ``(report, url)`` of ``posts``, ``at_once`` of them at
    a time; what each returned, in the order of ``posts`` (not the order they finished
    in). Each POST has its own ``timeout`` from the moment it starts, so collectors that
    never answer hold the caller about ``ceil(len(posts) / at_once) * timeout``."""
    if at_once < 1:
        raise ValueError(f"at_once must be at least 1, got {at_once}")
    slots = asyncio.Semaphore(at_once)

    async def one(report: Report, url: str) -> PostProblem | None:
        async with slots:
            return await post_report(
                report,
                url,
                resolver=resolver,
                allow_loopback=allow_loopback,
                context=context,
                timeout=timeout,
                source_address=source_address,
            )

    # gather keeps the order of its arguments, and lets an unexpected exception out as
    # it is (as the POSTs made one by one did).
    return list(await asyncio.gather(*(one(report, url) for report, url in posts)))


def _target(url: str) -> tuple[str, int, str]:
    """Host (ASCII, an address without brackets), port and path with query of an https
    ``url``; raises what httpx raises for one it cannot parse, or ValueError."""
    import httpx

    parsed = httpx.URL(url)
    if parsed.scheme != "https":
        raise ValueError("not an https URL")
    if not parsed.host:  # decoding the host checks its A-labels ("xn--" raises)
        raise ValueError("no host")
    host = parsed.raw_host.decode("ascii")
    if not https.is_address(host):
        # A host name (RFC 1123 §2.1), not whatever DNS can hold: httpx keeps
        # "exa%20mple.com" as written, and it was looked up so.
        try:
            ldh_domain_name(host)
        except ValueError:
            raise ValueError(f"no valid host name: {shorten(host, 100)}") from None
    port = 443 if parsed.port is None else parsed.port  # port 0 is no port: refused
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return host, port, parsed.raw_path.decode("ascii")


async def _post_to_one_of(
    addresses: list[str],
    report: Report,
    host: str,
    port: int,
    path: str,
    context: ssl.SSLContext | None,
    timeout: float,
    deadline: asyncio.Timeout,
    source_address: str | None,
) -> PostProblem | None:
    import httpx

    failure = "no address"
    for ip in addresses:
        timeouts = https.timeouts_before(deadline)  # what is left, for this address
        try:
            async with (
                https.client(context or https.default_context(), timeout, source_address) as http,
                https.stream_at(
                    http,
                    "POST",
                    host=host,
                    ip=ip,
                    port=port,
                    path=path,
                    headers={"Content-Type": MEDIA_TYPE},
                    timeouts=timeouts,
                    content=report.gzipped(),
                ) as response,
            ):
                status = response.status_code
        except httpx.ConnectTimeout:
            # Connecting or the handshake stalled, and was ended well before the deadline
            # (https.CONNECT_SHARE). Nothing was sent: the next address gets the time left.
            failure = https.connect_timed_out(ip, timeouts)
            continue
        except httpx.TimeoutException:
            # Any other: writing the report or waiting for the answer. It may have arrived,
            # so no other address is tried (it could be posted twice). These timeouts end
            # where the deadline does: it is reached, and reported as such.
            raise TimeoutError from None
        except httpx.ConnectError as exc:
            # Nothing was sent: the next address may do. After that, a failure is the
            # answer (trying again could post the report twice).
            failure = f"{ip}: {type(exc).__name__}: {https.quoted(exc)}"
            continue
        except httpx.HTTPError as exc:
            return PostProblem(f"{ip}: {type(exc).__name__}: {https.quoted(exc)}")
        if 200 <= status < 300:
            return None
        # A 4xx refuses the request as made: sent again it is refused again (but for a
        # request that took too long, 408, or came too often, 429).
        return PostProblem(f"HTTP {status}", permanent=400 <= status < 500 and status not in _AGAIN)
    return PostProblem(failure)


_AGAIN = (408, 429)

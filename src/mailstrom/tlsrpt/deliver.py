"""Sending a TLS report where the policy domain asked (RFC 8460 §5): by mail, as a
``multipart/report`` message with the gzipped JSON attached (queued like any other mail,
so it is retried and signed like the rest), or by an HTTPS POST of the gzipped JSON.
"""

from __future__ import annotations

import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from mailstrom._version import __version__
from mailstrom.message.addrspec import validate_address
from mailstrom.tlsrpt.report import MEDIA_TYPE, Report

POST_TIMEOUT = 30.0
"""Seconds one POST may take."""


def report_message(report: Report, *, sender: str, to: str, submitter: str) -> EmailMessage:
    """The mail carrying ``report`` to ``to`` (RFC 8460 §5.3: subject, the
    ``TLS-Report-Domain``/``TLS-Report-Submitter`` fields, ``multipart/report`` with
    ``report-type="tlsrpt"``). ``to`` comes from the policy domain's DNS: one that is no
    addr-spec raises :class:`~mailstrom.errors.InvalidAddress`."""
    # Checked before the email package sees it, which raises IndexError for "a@" and
    # ValueError for a CR LF.
    recipient = validate_address(to).header
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


def post_report(
    report: Report,
    url: str,
    *,
    context: ssl.SSLContext | None = None,
    timeout: float = POST_TIMEOUT,
) -> str | None:
    """POST ``report`` (gzipped) to the https ``url``; None when the endpoint answered
    2xx, else why not. Redirects are not followed (RFC 8460 §5.4 asks for a 2xx), and the
    answer's body is never read: only its status counts."""
    import httpx  # the mta-sts extra; checked by the caller

    try:
        with (
            httpx.Client(
                verify=context if context is not None else True,
                follow_redirects=False,
                timeout=timeout,
                trust_env=False,
            ) as client,
            client.stream(
                "POST",
                url,
                content=report.gzipped(),
                headers={"Content-Type": MEDIA_TYPE, "User-Agent": f"mailstrom/{__version__}"},
            ) as response,
        ):
            status = response.status_code
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    except (httpx.InvalidURL, UnicodeError) as exc:
        # The URL comes from DNS: one httpx cannot parse ("https://xn--/") is the record's
        # problem, not a crash of the command.
        return f"invalid URL: {type(exc).__name__}: {str(exc)[:200]}"
    if 200 <= status < 300:
        return None
    return f"HTTP {status}"

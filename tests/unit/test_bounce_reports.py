"""Reading real DSNs (Postfix, Exim) and an ARF complaint; VERP tokens."""

from __future__ import annotations

import base64
import email.message
import hashlib
import quopri
import re
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailstrom.bounces import ReportKind, parse_report
from mailstrom.bounces.reports import MAX_CONTENT_TYPE, MAX_CONTENT_TYPES, MAX_DEPTH
from mailstrom.bounces.verp import (
    check_verp_template,
    find_tokens,
    per_recipient,
    recipient_token,
    verp_address,
)
from mailstrom.errors import InvalidAddress, InvalidReport
from mailstrom.policy.hardbounce import DEFAULT_SUPPRESS_ON, is_late_hard_bounce
from mailstrom.stores.base import LeasedRecipient, WorkItem

SAMPLES = Path(__file__).parents[1] / "samples" / "bounces"
MID = "0190f3a2c4e1b7d08a4f2c6e9b1d3f57"


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def global_dsn(*, utf8: bool = True, base64_body: bool = False, qp_body: bool = False) -> bytes:
    """The Postfix sample as an SMTPUTF8 server sends it: message/global-delivery-status
    (RFC 6533), with a UTF-8 recipient in raw UTF-8, the part in 8bit, in base64 or in
    quoted-printable (its lines over 76 characters broken with soft line breaks)."""
    data = sample("postfix-dsn-full.eml").replace(
        b"message/delivery-status", b"message/global-delivery-status"
    )
    if utf8:
        data = data.replace(
            b"Final-Recipient: rfc822; nosuchuser@receiver.test",
            "Final-Recipient: utf-8; ñoño@receiver.test".encode(),
        )
    if base64_body or qp_body:
        head = b"Content-Type: message/global-delivery-status\r\n\r\n"
        start = data.index(head) + len(head)
        end = data.index(b"\r\n--", start)
        if base64_body:
            encoded = base64.encodebytes(data[start:end]).replace(b"\n", b"\r\n")
        else:
            encoded = quopri.encodestring(data[start:end].replace(b"\r\n", b"\n"))
            encoded = encoded.replace(b"\n", b"\r\n")
        cte = b"base64" if base64_body else b"quoted-printable"
        data = (
            data[: start - 2]
            + b"Content-Transfer-Encoding: "
            + cte
            + b"\r\n\r\n"
            + encoded
            + data[end:]
        )
    return data


@pytest.mark.parametrize(("base64_body", "qp_body"), [(False, False), (True, False), (False, True)])
def test_a_global_delivery_status_report_names_its_recipients(
    base64_body: bool, qp_body: bool
) -> None:
    """RFC 6533: the parser does not split message/global-delivery-status into blocks as
    it does message/delivery-status, so such a report read as having no recipient (and
    the bounce was left unmatched); its raw UTF-8 came out as U+FFFD. In quoted-printable
    the part's ASCII first lines read as header fields, so it was not decoded: the
    recipient was "=C3=B1o=C3=B1o@receiver.test" and a soft line break cut a field."""
    report = parse_report(global_dsn(base64_body=base64_body, qp_body=qp_body))
    assert report is not None and report.reporting_mta == "mx.receiver.test"
    [r] = report.recipients
    assert (r.final_recipient, r.action, r.status) == ("ñoño@receiver.test", "failed", "5.1.1")
    assert r.diagnostic == 'unknown user: "nosuchuser"'
    # X-Postfix-Sender, past 76 characters, holds the token across a soft line break.
    assert (MID, "5d41402abc") in set(find_tokens(report.envelope_senders[-2:-1]))
    plain = parse_report(global_dsn(utf8=False, base64_body=base64_body, qp_body=qp_body))
    assert plain is not None
    assert [r.final_recipient for r in plain.recipients] == ["nosuchuser@receiver.test"]


def test_a_report_typed_global_delivery_status_is_a_dsn() -> None:
    """A report holding message/global-delivery-status is often typed so too
    (``report-type=global-delivery-status``): it was read as no report, and the bounce
    of an SMTPUTF8 recipient was ignored."""
    data = global_dsn().replace(
        b"report-type=delivery-status", b"report-type=global-delivery-status", 1
    )
    assert b"report-type=global-delivery-status" in data
    report = parse_report(data)
    assert report is not None and report.kind is ReportKind.DSN
    assert [(r.final_recipient, r.status) for r in report.recipients] == [
        ("ñoño@receiver.test", "5.1.1")
    ]


def test_postfix_dsn_with_dsn_parameters() -> None:
    report = parse_report(sample("postfix-dsn-headers.eml"))
    assert report is not None and report.kind is ReportKind.DSN
    assert report.reporting_mta == "mx.receiver.test"
    assert report.envelope_id == MID
    assert report.original_message_id == "<sample-1@sender.test>"
    [r] = report.recipients
    assert r.final_recipient == "nosuchuser@receiver.test"
    assert r.original_recipient == "NoSuchUser@receiver.test"
    assert (r.action, r.status) == ("failed", "5.1.1")
    assert r.diagnostic == 'unknown user: "nosuchuser"'
    assert r.diagnostic_code is None  # an X-Postfix diagnostic, not an SMTP reply
    assert list(find_tokens(report.envelope_senders)) == [(MID, "5d41402abc")]


def test_postfix_dsn_returning_the_whole_message() -> None:
    report = parse_report(sample("postfix-dsn-full.eml"))
    assert report is not None
    assert report.envelope_id is None
    assert report.original_message_id == "<sample-2@sender.test>"
    assert [r.original_recipient for r in report.recipients] == ["nosuchuser@receiver.test"]


def test_exim_dsn() -> None:
    report = parse_report(sample("exim-dsn.eml"))
    assert report is not None and report.kind is ReportKind.DSN
    [r] = report.recipients
    assert (r.final_recipient, r.original_recipient) == ("nosuchuser@receiver.test", None)
    assert (r.action, r.status) == ("failed", "5.0.0")
    assert report.original_message_id == "<sample-3@sender.test>"
    assert (MID, "5d41402abc") in set(find_tokens(report.envelope_senders))


def test_qmail_bounce() -> None:
    """qmail sends no RFC 3464 report but its own plain-text format (QSBMF): a paragraph
    per failed recipient, ``<address>:`` then the reason, which ends in its RFC 3463 code
    ("(#5.1.1)") or quotes the remote server's reply. It was read as no report, and the
    address that bounced was never failed or suppressed."""
    report = parse_report(sample("qmail-bounce.eml"))
    assert report is not None and report.kind is ReportKind.DSN
    assert report.reporting_mta == "mx.receiver.test"
    assert report.original_message_id == "<sample-5@sender.test>"
    [r] = report.recipients
    assert r.final_recipient == "nosuchuser@receiver.test"
    assert (r.action, r.status) == ("failed", "5.1.1")
    assert r.diagnostic == "Sorry, no mailbox here by that name. (#5.1.1)"
    assert r.diagnostic_code is None
    assert (MID, "5d41402abc") in set(find_tokens(report.envelope_senders))


@pytest.mark.parametrize("inner", [b"\r", b"\n", b"\r\n"], ids=["CR", "LF", "CRLF"])
def test_an_encoded_qmail_bounce_is_read_whatever_its_line_ends(inner: bytes) -> None:
    """As a status part (see below): its body in base64 with a CR alone ending each
    line read as no bounce, its paragraphs never split."""
    head, _, body = sample("qmail-bounce.eml").partition(b"\r\n\r\n")
    body = re.sub(rb"\r\n|\r|\n", inner, body)
    data = (
        head
        + b"\r\nMIME-Version: 1.0\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(body).replace(b"\n", b"\r\n")
    )
    report = parse_report(data)
    assert report is not None and report.reporting_mta == "mx.receiver.test"
    assert report.original_message_id == "<sample-5@sender.test>"
    [r] = report.recipients
    assert (r.final_recipient, r.status) == ("nosuchuser@receiver.test", "5.1.1")


def test_a_qmail_bounce_relaying_a_reply_gives_its_codes() -> None:
    remote = (
        b"<ann@receiver.test>:\r\n"
        b"192.0.2.7 does not like recipient.\r\n"
        b"Remote host said: 552 5.2.2 <ann@receiver.test>: mailbox full\r\n"
        b"Giving up on 192.0.2.7.\r\n"
        b"\r\n"
        b"<Bob@Receiver.test>:\r\n"
        b"This address no longer accepts mail.\r\n"
        b"\r\n"
        b"<nosuchuser@receiver.test>:\r\n"
    )
    data = sample("qmail-bounce.eml").replace(b"<nosuchuser@receiver.test>:\r\n", remote, 1)
    report = parse_report(data)
    assert report is not None
    ann, bob, nosuchuser = report.recipients
    assert (ann.final_recipient, ann.status, ann.diagnostic_type) == (
        "ann@receiver.test",
        None,
        "smtp",
    )
    assert ann.diagnostic == "552 5.2.2 <ann@receiver.test>: mailbox full"
    assert (ann.diagnostic_code, ann.diagnostic_status) == (552, "5.2.2")
    assert bob.final_recipient == "Bob@Receiver.test"
    assert (bob.status, bob.diagnostic_code) == (None, None)
    assert bob.diagnostic == "This address no longer accepts mail."
    assert nosuchuser.status == "5.1.1"
    assert {r.action for r in report.recipients} == {"failed"}


def test_a_qmail_reason_after_an_empty_line_is_the_recipients() -> None:
    """A program's output that starts with an empty line (ezmlm's) makes the reason a
    paragraph of its own after the address line."""
    data = sample("qmail-bounce.eml").replace(
        b"<nosuchuser@receiver.test>:\r\n",
        b"<list@receiver.test>:\r\n\r\nezmlm-reject: fatal: Sorry, no empty Subject (#5.7.0)\r\n"
        b"\r\n<nosuchuser@receiver.test>:\r\n",
    )
    report = parse_report(data)
    assert report is not None
    ezmlm, nosuchuser = report.recipients
    assert (ezmlm.final_recipient, ezmlm.status) == ("list@receiver.test", "5.7.0")
    assert ezmlm.diagnostic == "ezmlm-reject: fatal: Sorry, no empty Subject (#5.7.0)"
    assert (nosuchuser.final_recipient, nosuchuser.status) == ("nosuchuser@receiver.test", "5.1.1")


def test_a_message_that_only_starts_like_a_qmail_bounce_is_no_report() -> None:
    assert parse_report(b"Subject: hello\r\n\r\nHi. This is the office of Dr. Smith.\r\n") is None
    no_break = sample("qmail-bounce.eml").replace(b"--- Below this line", b"Below this line")
    assert parse_report(no_break) is None


def test_a_run_of_empty_lines_before_a_qmail_bounces_break_is_read_once() -> None:
    """The break paragraph was looked for with a pattern that, at each line end of a run
    of empty lines not followed by "-", read the rest of the run again: time quadratic in
    its length. MAX_LINES bounds what is parsed, but not the text of a part in base64: a
    few hundred kilobytes of a mail that begins "Hi. This is the" kept `mailstrom bounce`
    busy for many minutes (49,000 empty lines alone took half a minute)."""
    head, _, body = sample("qmail-bounce.eml").replace(b"\r\n", b"\n").partition(b"\n\n")
    body = body.replace(b"work out.\n", b"work out.\n" + b"\n" * 200_000, 1)
    data = head + b"\nContent-Transfer-Encoding: base64\n\n" + base64.encodebytes(body)
    report = parse_report(data)
    assert report is not None
    [r] = report.recipients
    assert (r.final_recipient, r.status) == ("nosuchuser@receiver.test", "5.1.1")


def test_a_global_delivery_status_decoded_by_its_block_is_bounded() -> None:
    """A message/global-delivery-status part is read as one message: its per-message
    block the header, the recipient blocks the body. A Content-Transfer-Encoding field in
    that block (whoever sends the report writes it) had the body decoded whole, past the
    bound on lines parsed (MAX_LINES): megabytes of base64 on one line made a header
    field of every three octets, a hundred megabytes and more to parse. What is decoded
    is now bounded as an encoded part's text is."""
    data = global_dsn(utf8=False)
    head = b"Content-Type: message/global-delivery-status\r\n\r\n"
    start = data.index(head) + len(head)
    end = data.index(b"\r\n--", start)
    message_block, _, recipients = data[start:end].partition(b"\r\n\r\n")
    lines = base64.b64encode(recipients + b"\r\n" + b"a:\n" * 800_000)
    body = message_block + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n" + lines
    tracemalloc.start()
    try:
        report = parse_report(data[:start] + body + data[end:])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report is not None
    [r] = report.recipients
    assert (r.final_recipient, r.status) == ("nosuchuser@receiver.test", "5.1.1")
    assert peak < 60_000_000  # 3.2 MB of input; decoded whole, 120 MB


def test_arf_complaint() -> None:
    report = parse_report(sample("arf-complaint.eml"))
    assert report is not None and report.kind is ReportKind.COMPLAINT
    assert report.feedback_type == "abuse"
    assert report.reporting_mta == "fbl.mailbox.test"
    assert [r.final_recipient for r in report.recipients] == ["carol@mailbox.test"]
    assert report.original_message_id == "<sample-4@sender.test>"
    assert (MID, "5d41402abc") in set(find_tokens(report.envelope_senders))


def test_an_smtp_diagnostic_gives_its_code() -> None:
    text = sample("postfix-dsn-headers.eml").replace(
        b'Diagnostic-Code: X-Postfix; unknown user: "nosuchuser"',
        b"Remote-MTA: dns; mx2.receiver.test\nDiagnostic-Code: smtp; 550 5.1.1 <x>: no such user",
    )
    report = parse_report(text)
    assert report is not None
    [r] = report.recipients
    assert (r.diagnostic_code, r.remote_mta) == (550, "mx2.receiver.test")


def test_comments_in_report_fields_are_not_their_contents() -> None:
    """RFC 3464 §2.1.1: text in parentheses is a comment, "not part of the contents" of a
    DSN field (RFC 5965's fields allow CFWS too). ``Action: failed (permanent)`` read as
    an action other than failed (the bounce ignored), an address with a comment matched
    no recipient, and ``Feedback-Type: abuse (spam)`` was no complaint."""
    dsn = (
        sample("postfix-dsn-headers.eml")
        .replace(
            b"Final-Recipient: rfc822; nosuchuser@receiver.test",
            b"Final-Recipient: rfc822 (type); nosuchuser@receiver.test (the user)",
        )
        .replace(b"Original-Recipient: rfc822;", b'Original-Recipient: rfc822;"a (b)"@x.test ')
        .replace(b"NoSuchUser@receiver.test", b"(was)")
        .replace(b"Action: failed", b"Action: failed (bad destination)")
        .replace(
            b"Status: 5.1.1", b"Status: 5.1.1(no such user)\r\nRemote-MTA: dns; mx.test (1.2.3.4)"
        )
    )
    report = parse_report(dsn)
    assert report is not None
    [r] = report.recipients
    assert (r.final_recipient, r.original_recipient) == (
        "nosuchuser@receiver.test",
        '"a (b)"@x.test',  # a quoted local part's parentheses are no comment
    )
    assert (r.action, r.status, r.remote_mta) == ("failed", "5.1.1", "mx.test")
    arf = (
        sample("arf-complaint.eml")
        .replace(b"Feedback-Type: abuse", b"Feedback-Type: abuse (spam button)")
        .replace(b"Original-Rcpt-To: ", b"Original-Rcpt-To: (rcpt) ")
    )
    complaint = parse_report(arf)
    assert complaint is not None and complaint.feedback_type == "abuse"
    assert [r.final_recipient for r in complaint.recipients] == ["carol@mailbox.test"]


def test_a_comment_after_the_envelope_id_or_message_id_is_not_part_of_it() -> None:
    """RFC 3464 §2.1.1 (a DSN field's comment) and RFC 5322 §3.6.4 (CFWS around a
    msg-id): both were read with the comment, so neither matched the queued message."""
    dsn = (
        sample("postfix-dsn-headers.eml")
        .replace(
            f"Original-Envelope-Id: {MID}".encode(), f"Original-Envelope-Id: {MID} (id)".encode()
        )
        .replace(
            b"Message-ID: <sample-1@sender.test>",
            b"Message-ID: (was) <sample-1@sender.test> (sent)",
        )
    )
    report = parse_report(dsn)
    assert report is not None
    assert (report.envelope_id, report.original_message_id) == (MID, "<sample-1@sender.test>")


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("4\u00b20", "5.1.1"),  # SUPERSCRIPT TWO: str.isdigit(), but int() raised ValueError
        ("5\u0665\u0660", "5.1.1"),  # ARABIC-INDIC 50: int() read 550
        ("550", "5.\u0661.1"),  # ARABIC-INDIC ONE in the status
        ("550", "5.\u00b2.1"),
        ("550", "5.1.1111"),  # RFC 3463: 1 to 3 digits
    ],
)
def test_codes_in_a_report_are_ascii_digits(code: str, status: str) -> None:
    text = (
        sample("postfix-dsn-headers.eml")
        .replace(b"Status: 5.1.1", f"Status: {status}".encode())
        .replace(
            b'Diagnostic-Code: X-Postfix; unknown user: "nosuchuser"',
            f"Diagnostic-Code: smtp; {code} no such user".encode(),
        )
    )
    assert f"{code} no such user".encode() in text
    report = parse_report(text)
    assert report is not None
    [r] = report.recipients
    assert r.diagnostic_code == (550 if code == "550" else None)
    assert r.status == (None if status != "5.1.1" else "5.1.1")


@pytest.mark.parametrize(
    ("name", "written"),
    [
        ("postfix-dsn-full.eml", b"report-type*=us-ascii''delivery-status"),  # RFC 2231 §4
        ("postfix-dsn-full.eml", b"report-type*=''delivery%2Dstatus"),  # percent-encoded
        ("postfix-dsn-full.eml", b"report-type*0=delivery-; report-type*1=status"),  # §3
        ("arf-complaint.eml", b"report-type*=utf-8'en'feedback%2Dreport"),
        ("arf-complaint.eml", b"report-type*=undefined''feedback-report"),  # no codec's
    ],
)
def test_a_report_type_in_rfc_2231_form_is_read(name: str, written: bytes) -> None:
    """The report type was read with compat32's get_param, which gives a parameter in
    RFC 2231 form as a (charset, language, value) tuple: its str() named no report type,
    so such a DSN or ARF report read as no report and the bounce was left unmatched."""
    data = sample(name)
    plain = re.search(rb"report-type=[a-z-]+", data)
    assert plain is not None
    expected = parse_report(data)
    assert expected is not None
    report = parse_report(data.replace(plain[0], written))
    assert report is not None
    assert (report.kind, report.recipients) == (expected.kind, expected.recipients)


def test_other_mail_is_no_report() -> None:
    assert parse_report(b"Subject: Out of office\r\n\r\nBack on Monday.\r\n") is None
    other = (
        b"Content-Type: multipart/report; report-type=disposition-notification;"
        b' boundary="b"\r\n\r\n--b--\r\n'
    )
    assert parse_report(other) is None
    assert parse_report(b"") is None


def test_a_report_without_its_status_part_is_invalid() -> None:
    broken = (
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nsorry\r\n--b--\r\n"
    )
    with pytest.raises(InvalidReport, match="message/delivery-status"):
        parse_report(broken)


def test_a_report_cut_short_still_reads() -> None:
    data = sample("postfix-dsn-full.eml")
    cut = data[: data.index(b"Content-Description: Undelivered Message") + 20]
    report = parse_report(cut)
    assert report is not None and report.recipients[0].status == "5.1.1"


def test_recipients_per_report_are_bounded() -> None:
    block = b"Final-Recipient: rfc822; a@x.test\nAction: failed\nStatus: 5.1.1\n\n"
    data = (
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\n\n'
        b"--b\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; x\n\n"
        + block * 3000
        + b"--b--\n"
    )
    report = parse_report(data)
    assert report is not None and len(report.recipients) == 1000


ESC_SEQUENCES = "\x1b]0;owned\x1b\\\x1b[2J\x1b[31mRED"


def test_report_text_reaches_nobody_with_control_characters() -> None:
    # A report's sender chooses its words: they are stored and shown to the operator.
    data = (
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; mx%(e)s.receiver.test\r\nOriginal-Envelope-Id: e%(e)s\r\n\r\n"
        b"Final-Recipient: rfc822; bob%(e)s@receiver.test\r\nAction: failed\r\n"
        b"Status: 5.1.1\r\nRemote-MTA: dns; r%(e)s\r\n"
        b"Diagnostic-Code: smtp; 550 5.1.1 %(e)s\r\n  folded\tline \xe2\x80\xae\r\n\r\n"
        b"--b\r\nContent-Type: text/rfc822-headers\r\n\r\nMessage-ID: <m%(e)s@x>\r\n"
        b"\r\n--b--\r\n"
    ) % {b"e": ESC_SEQUENCES.encode()}
    report = parse_report(data)
    assert report is not None
    [r] = report.recipients
    shown = "\ufffd]0;owned\ufffd\\\ufffd[2J\ufffd[31mRED"
    assert report.reporting_mta == f"mx{shown}.receiver.test"
    assert report.envelope_id == f"e{shown}"
    assert report.original_message_id == f"<m{shown}@x>"
    assert r.final_recipient == f"bob{shown}@receiver.test"
    assert r.remote_mta == f"r{shown}"
    # Folded whitespace is one space, as before; the 8-bit octets are read as UTF-8
    # (RFC 6532): U+202E, a bidi control, shown as one U+FFFD.
    assert r.diagnostic == f"550 5.1.1 {shown} folded line \ufffd"


def nested_report(levels: int, level: str) -> bytes:
    """A DSN whose returned message nests ``levels`` deep below the report's own two
    levels, one ``level`` (a multipart or a message type) at a time."""
    head = (
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="r"\r\n\r\n'
        b"--r\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; m\r\n\r\n"
        b"Final-Recipient: rfc822; a@x.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
        b"--r\r\nContent-Type: message/rfc822\r\n\r\n"
    )
    if level.startswith("multipart/"):
        body = "".join(
            f'Content-Type: {level}; boundary="b{i}"\r\n\r\n--b{i}\r\n' for i in range(levels)
        )
    else:
        body = f"Content-Type: {level}\r\n\r\n" * levels
    return head + body.encode() + b"Subject: innermost\r\n\r\nx\r\n"


@pytest.mark.parametrize("level", ["multipart/mixed", "message/rfc822", "message/global"])
def test_nesting_is_bounded(level: str) -> None:
    # As deep as any mail sent may nest, inside the report: read.
    report = parse_report(nested_report(MAX_DEPTH - 2, level))
    assert report is not None and report.recipients[0].status == "5.1.1"
    # One level more: refused as the parser meets it, with a typed error, not a
    # RecursionError from the standard library's parser (thousands of levels).
    for levels in (MAX_DEPTH - 1, 20_000):
        with pytest.raises(InvalidReport, match=f"nested more than {MAX_DEPTH} levels deep"):
            parse_report(nested_report(levels, level))


def nested_blocks(levels: int) -> str:
    """Header sections each saying multipart: a non-header line ends each, so no blank
    line (which would end the block) is needed."""
    return "".join(f"Content-Type: multipart/mixed; boundary=b{i}\n--b{i}\n" for i in range(levels))


@pytest.mark.parametrize("where", ["global", "base64", "feedback"])
def test_nesting_inside_a_status_or_feedback_block_is_bounded(where: str) -> None:
    """The blocks of a message/global-delivery-status, an encoded message/delivery-status
    and a message/feedback-report with a body are parsed apart from the report."""
    block = (
        "Reporting-MTA: dns; x\n\nFinal-Recipient: rfc822; a@x.test\nAction: failed\n"
        f"Status: 5.1.1\n{nested_blocks(3000)}"
    )
    report_type = "feedback-report" if where == "feedback" else "delivery-status"
    head = (
        f"Content-Type: multipart/report; report-type={report_type}; boundary=ZZ\n\n"
        "--ZZ\nContent-Type: text/plain\n\nhi\n--ZZ\n"
    )
    if where == "global":
        part = f"Content-Type: message/global-delivery-status\n\n{block}"
    elif where == "base64":
        encoded = base64.encodebytes(block.encode()).decode()
        part = (
            f"Content-Type: message/delivery-status\nContent-Transfer-Encoding: base64\n\n{encoded}"
        )
    else:
        body = f"Feedback-Type: abuse\n\n{nested_blocks(3000)}"
        part = f"Content-Type: message/feedback-report\n\n{body}"
    with pytest.raises(InvalidReport, match=f"nested more than {MAX_DEPTH} levels deep"):
        parse_report(f"{head}{part}\n--ZZ--\n".encode())


def report_with_content_type(octets: int, where: str, end: str = "\r\n") -> bytes:
    """A DSN with one Content-Type field of ``octets`` (folded lines and all): its own,
    or that of the returned message; its lines end with ``end``."""
    own = "Content-Type: multipart/report; report-type=delivery-status; boundary=b"
    returned = "Content-Type: text/plain"
    base = returned if where == "returned part" else own
    fold = f"{end} " if where == "folded" else ""
    field = base + fold + ";" * (octets - len(base) - len(fold))
    assert len(field) == octets
    return (
        (
            f"{field if base == own else own}\r\n\r\n--b\r\n"
            "Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; m\r\n\r\n"
            "Final-Recipient: rfc822; a@x.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
            f"--b\r\nContent-Type: message/rfc822\r\n\r\n{field if base == returned else ''}\r\n"
            "Subject: x\r\n\r\nx\r\n--b--\r\n"
        )
        .replace("\r\n", end)
        .encode()
    )


@pytest.mark.parametrize("where", ["report", "folded", "returned part"])
def test_a_content_type_field_is_bounded(where: str) -> None:
    """The standard library reads a Content-Type's parameters in time quadratic in its
    length (minutes for one field of ten megabytes): one longer than the bound is
    refused before it is parsed, wherever it is."""
    report = parse_report(report_with_content_type(MAX_CONTENT_TYPE, where))
    assert report is not None and report.recipients[0].status == "5.1.1"
    with pytest.raises(InvalidReport, match=f"at most {MAX_CONTENT_TYPE}"):
        parse_report(report_with_content_type(MAX_CONTENT_TYPE + 1, where))


@pytest.mark.parametrize("where", ["report", "folded", "returned part"])
@pytest.mark.parametrize("end", ["\r", "\n"])
def test_a_content_type_field_is_bounded_whatever_ends_its_lines(end: str, where: str) -> None:
    """The parser ends a line at a CR alone too. Was: a Content-Type field that began
    after one was not seen by the bound, and was parsed in quadratic time: 5 s for one of
    400 kB, hours for ten megabytes."""
    fits = report_with_content_type(MAX_CONTENT_TYPE, where, end)
    report = parse_report(fits)
    assert report is not None and report.recipients[0].status == "5.1.1"
    over = report_with_content_type(MAX_CONTENT_TYPE + 1, where, end)
    with pytest.raises(InvalidReport, match=f"at most {MAX_CONTENT_TYPE}"):
        parse_report(over)


def test_returned_headers_are_read_as_headers_only() -> None:
    nested = nested_report(5_000, "multipart/mixed").replace(
        b"Content-Type: message/rfc822\r\n\r\n",
        b"Content-Type: text/rfc822-headers\r\n\r\nMessage-ID: <m@x.test>\r\n",
        1,
    )
    report = parse_report(nested)
    assert report is not None and report.original_message_id == "<m@x.test>"


def test_late_hard_bounces() -> None:
    assert is_late_hard_bounce("5.1.1", code=None, codes=DEFAULT_SUPPRESS_ON)
    assert is_late_hard_bounce("5.0.0", code=None, codes=DEFAULT_SUPPRESS_ON)
    assert not is_late_hard_bounce("5.2.2", code=552, codes=DEFAULT_SUPPRESS_ON)
    assert not is_late_hard_bounce("4.0.0", code=None, codes=DEFAULT_SUPPRESS_ON)


@pytest.mark.parametrize(
    ("diagnostic", "suppresses"),
    [
        ("smtp; 552 5.2.2 Mailbox full", False),
        ("smtp; 550-5.7.1 Message rejected as spam", False),
        ("smtp; 550 Message rejected", False),  # a bare 550 is no address's fault either
        ("smtp; 550 5.1.1 No such user", True),
        ("smtp; 556 Domain does not accept mail", True),
        ("smtp; 550 4.2.2 class mismatch", False),  # RFC 2034 §4: not this reply's code
        ("X-Exim; unrouteable address", True),  # no reply: the detail-less 5.0.0 itself
    ],
)
def test_exims_5_0_0_is_judged_by_the_reply_it_relays(diagnostic: str, suppresses: bool) -> None:
    """Exim writes Status: 5.0.0 for every failed address and the remote reply in the
    Diagnostic-Code."""
    text = sample("exim-dsn.eml").replace(
        b"Status: 5.0.0\r\n", f"Status: 5.0.0\r\nDiagnostic-Code: {diagnostic}\r\n".encode()
    )
    assert diagnostic.encode() in text
    report = parse_report(text)
    assert report is not None
    [r] = report.recipients
    assert r.status == "5.0.0"
    hard = is_late_hard_bounce(
        r.status,
        code=r.diagnostic_code,
        diagnostic_status=r.diagnostic_status,
        codes=DEFAULT_SUPPRESS_ON,
    )
    assert hard is suppresses


# --- VERP ---------------------------------------------------------------------------


KEY = bytes(range(32))


def test_tokens_round_trip_and_name_the_recipient() -> None:
    token = recipient_token(MID, "Bob@Example.org", key=KEY)
    assert token == recipient_token(MID, "bob@example.org", key=KEY)
    assert token != recipient_token(MID, "ann@example.org", key=KEY)
    address = verp_address("bounces+{token}@sender.test", MID, "bob@example.org", key=KEY)
    assert address == f"bounces+{token}@sender.test"
    assert len(address.partition("@")[0]) <= 64
    assert list(find_tokens([address.upper(), address])) == [tuple(token.split("-"))]


def test_a_token_cannot_be_made_without_the_key() -> None:
    # Bob sees his own token and knows Carol's address (Cc): without the store's key,
    # neither the unkeyed digest nor his own token's digest is Carol's.
    carol = recipient_token(MID, "carol@example.net", key=KEY)
    unkeyed = hashlib.blake2s(b"carol@example.net", digest_size=5).hexdigest()
    assert carol != f"{MID}-{unkeyed}"
    assert carol != recipient_token(MID, "carol@example.net", key=bytes(32))
    assert carol.split("-")[1] != recipient_token(MID, "bob@example.org", key=KEY).split("-")[1]
    # A token is good for one message only.
    other = "0190f3a2c4e1b7d08a4f2c6e9b1d3f58"
    assert carol.split("-")[1] != recipient_token(other, "carol@example.net", key=KEY)[33:]


def test_no_token_is_made_with_an_empty_key() -> None:
    # An empty key is BLAKE2s unkeyed: anybody could make the token. The worker reads
    # the store's key only when a VERP message needs it; this guards against forgetting.
    with pytest.raises(ValueError, match="VERP key"):
        recipient_token(MID, "carol@example.net", key=b"")


def test_templates_are_checked() -> None:
    check_verp_template("bounces+{token}@sender.test")
    check_verp_template("{token}@sender.test")
    check_verp_template("bounces-{token}-x@sender.test")
    for bad in ("bounces@{token}.test", "{token}{token}@x.test", "b" * 30 + "+{token}@x.test"):
        with pytest.raises(InvalidAddress):
            check_verp_template(bad)


@pytest.mark.parametrize(
    "template", ["bounce{token}@sender.test", "{token}a@sender.test", "B9{token}+x@sender.test"]
)
def test_a_template_with_a_hex_digit_next_to_its_token_is_refused(template: str) -> None:
    """find_tokens() reads no token that a hex digit touches, so no bounce would match."""
    address = verp_address(template, MID, "bob@example.org", key=KEY)
    assert list(find_tokens([address])) == []
    with pytest.raises(InvalidAddress, match="other than a hex digit"):
        check_verp_template(template)


def test_a_verp_item_becomes_one_transaction_per_recipient() -> None:
    now = datetime(2026, 11, 30, tzinfo=UTC)
    recipients = tuple(
        LeasedRecipient(address=a, attempts=0, first_attempt_at=None, created_at=now)
        for a in ("ann@example.org", "bob@example.org")
    )
    item = WorkItem(
        message_id=MID,
        lease_token="t",
        domain="example.org",
        envelope_from="bounces+{token}@sender.test",
        recipients=recipients,
        data=b"x",
        smtputf8=False,
        eightbit=False,
    )
    parts = per_recipient(item, key=KEY)
    assert [p.recipients for p in parts] == [(recipients[0],), (recipients[1],)]
    assert [p.envelope_from for p in parts] == [
        verp_address(item.envelope_from, MID, "ann@example.org", key=KEY),
        verp_address(item.envelope_from, MID, "bob@example.org", key=KEY),
    ]
    plain = WorkItem(
        **{**{f: getattr(item, f) for f in item.__slots__}, "envelope_from": "b@x.test"}
    )
    assert per_recipient(plain, key=KEY) == [plain]


# --- the notices mailstrom sends -----------------------------------------------------


def test_a_notice_keeps_peer_text_to_one_printable_line() -> None:
    from mailstrom.bounces.notice import FailedRecipient, render_notice, wants_notice
    from mailstrom.message.dsn import DSN, Notify

    now = datetime(2026, 11, 30, 12, tzinfo=UTC)
    hostile = "550 5.1.1 gone\r\nBcc: victim@example.org\r\n\r\n--x\x00 ünï" + "y" * 5000
    raw = render_notice(
        reporting_mta="mx.client.test",
        sender="app@sender.test",
        message_id=MID,
        original=b"Subject: hi\r\nMessage-ID: <m@x.test>\r\n\r\nbody\r\n",
        arrival=now,
        failed=[
            FailedRecipient(
                address="bob@example.org",
                status="5.1.1",
                diagnostic=hostile,
                remote_mta="mx.example.org",
                at=now,
            )
        ],
        dsn=None,
        now=now,
    )
    assert b"\nBcc:" not in raw and b"\x00" not in raw and raw.isascii()
    assert max(len(line) for line in raw.split(b"\r\n")) < 998
    report = parse_report(raw)
    assert report is not None
    [r] = report.recipients
    assert r.diagnostic is not None and r.diagnostic.startswith("550 5.1.1 gone Bcc: victim")
    assert report.original_message_id == "<m@x.test>"
    assert b"body" not in raw  # headers only unless RET=FULL
    assert not wants_notice("", DSN(), default=True)
    assert not wants_notice("a@x.test", DSN(notify=(Notify.DELAY,)), default=True)
    assert wants_notice("a@x.test", DSN(), default=False)
    assert wants_notice("a@x.test", None, default=True)


def test_a_notice_names_a_quoted_local_part_as_it_is() -> None:
    """A run of spaces in a quoted local part is part of the address: the notice's To
    field and each recipient field keep it (one space would name another mailbox)."""
    from mailstrom.bounces.notice import FailedRecipient, render_notice
    from mailstrom.message import prepare
    from mailstrom.message.dsn import DSN

    now = datetime(2026, 11, 30, 12, tzinfo=UTC)
    sender, recipient = '"ann  smith"@sender.test', '"john   doe"@example.org'
    raw = render_notice(
        reporting_mta="mx.client.test",
        sender=sender,
        message_id=MID,
        original=b"Subject: hi\r\n\r\nbody\r\n",
        arrival=now,
        failed=[
            FailedRecipient(
                address=recipient,
                status="5.1.1",
                diagnostic="550 5.1.1 no",
                remote_mta=None,
                at=now,
            )
        ],
        dsn=DSN(),
        now=now,
    )
    assert f"To: <{sender}>".encode() in raw
    assert f"Original-Recipient: rfc822;{recipient}".encode() in raw
    assert f"Final-Recipient: rfc822; {recipient}".encode() in raw
    report = parse_report(raw)
    assert report is not None
    [entry] = report.recipients
    assert (entry.final_recipient, entry.original_recipient) == (recipient, recipient)
    assert prepare(raw, envelope_from="", envelope_to=[sender]).recipients == (sender,)


@pytest.mark.parametrize("blank", [b" ", b"\t", b" \t "])
@pytest.mark.parametrize("kind", ["delivery-status", "global", "base64"])
def test_a_line_of_only_spaces_ends_a_dsn_block(blank: bytes, kind: str) -> None:
    """RFC 3464 §2.1: the blocks of a delivery-status part are separated by blank lines;
    one of only spaces or tabs (an MTA that indents, a hop that pads) is taken as one, as
    robust readers do. It was read as the fold of the field above it: the next
    recipient's fields joined the block before (the second recipient was lost, and
    after the per-message block every recipient)."""
    block = sample("postfix-dsn-full.eml").split(b"\r\n\r\nFinal-Recipient: ", 1)[1]
    block = b"Final-Recipient: " + block[: block.index(b"\r\n\r\n")] + b"\r\n"
    other = block.replace(b"nosuchuser", b"other")
    data = sample("postfix-dsn-full.eml").replace(
        b"\r\n\r\n" + block, b"\r\n" + blank + b"\r\n" + block + blank + b"\r\n" + other
    )
    if kind != "delivery-status":
        data = data.replace(b"message/delivery-status", b"message/global-delivery-status")
    if kind == "base64":
        head = b"Content-Type: message/global-delivery-status\r\n\r\n"
        start = data.index(head) + len(head)
        end = data.index(b"\r\n--", start)
        encoded = base64.encodebytes(data[start:end]).replace(b"\n", b"\r\n")
        data = (
            data[: start - 2] + b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded + data[end:]
        )
    report = parse_report(data)
    assert report is not None and report.reporting_mta == "mx.receiver.test"
    assert [(r.final_recipient, r.original_recipient, r.status) for r in report.recipients] == [
        ("nosuchuser@receiver.test", "nosuchuser@receiver.test", "5.1.1"),
        ("other@receiver.test", "other@receiver.test", "5.1.1"),
    ]


def test_an_encoded_status_part_with_raw_8bit_octets_is_read() -> None:
    """Was: UnicodeEncodeError (exit 70 from ``mailstrom bounce``). An 8-bit octet left
    raw in a quoted-printable part was turned into U+FFFD by ``get_payload()`` before the
    part was decoded, and decoding wants ASCII or the octets themselves."""
    data = global_dsn(utf8=False, qp_body=True).replace(b"unknown user", "unknown é user".encode())
    report = parse_report(data)
    assert report is not None
    [r] = report.recipients
    assert r.final_recipient == "nosuchuser@receiver.test"
    assert r.diagnostic == 'unknown é user: "nosuchuser"'


@pytest.mark.parametrize("charset", ["charset*=utf-8''x", "charset=idna"])
def test_a_charset_parameter_of_the_senders_choice_breaks_nothing(charset: str) -> None:
    """Was: TypeError (an RFC 2231 parameter, which ``get_param`` gives as a tuple) or
    UnicodeError (a codec that cannot replace what it cannot decode): ``get_payload()``
    decodes a text part's 8-bit octets by its charset parameter, and the report's sender
    writes it. The returned headers are read as they came."""
    data = (
        sample("postfix-dsn-full.eml")
        .replace(
            b"Content-Type: message/rfc822",
            f"Content-Type: text/rfc822-headers; {charset}".encode(),
        )
        .replace(b"Subject: sample 2", "Subject: sample é".encode())
    )
    report = parse_report(data)
    assert report is not None
    assert report.original_message_id == "<sample-2@sender.test>"
    assert report.recipients[0].status == "5.1.1"


def test_a_report_without_parts_and_with_8bit_octets_is_refused() -> None:
    """Was: TypeError for a multipart/report without a boundary (so its body is one text)
    whose 8-bit octets get_payload() decoded by an RFC 2231 charset parameter."""
    data = (
        b"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status;"
        b" charset*=utf-8''x\r\n\r\nno parts \xc3\xa9\r\n"
    )
    with pytest.raises(InvalidReport, match="without parts"):
        parse_report(data)


def _encoded_part(data: bytes, part_type: bytes, line_end: bytes) -> bytes:
    """``data`` with the body of its ``part_type`` part in base64."""
    head = b"Content-Type: " + part_type + line_end * 2
    start = data.index(head) + len(head)
    end = data.index(line_end + b"--", start)
    encoded = base64.encodebytes(data[start:end]).replace(b"\n", line_end)
    return (
        data[: start - len(line_end)]
        + b"Content-Transfer-Encoding: base64"
        + line_end * 2
        + encoded
        + data[end:]
    )


@pytest.mark.parametrize("blank", [b"", b" \t"])
@pytest.mark.parametrize("encoded", [False, True])
def test_a_blank_line_before_the_first_dsn_block_loses_nothing(blank: bytes, encoded: bool) -> None:
    """A blank line at the start of the message/delivery-status part (one more after the
    part's header) started an empty per-message block: the real one was read as a
    recipient block and skipped, and with it Reporting-MTA and the Original-Envelope-Id
    that matches mail sent without VERP."""
    head = b"Content-Type: message/delivery-status\r\n\r\n"
    data = sample("postfix-dsn-headers.eml").replace(head, head + blank + b"\r\n")
    if encoded:
        data = _encoded_part(data, b"message/delivery-status", b"\r\n")
    report = parse_report(data)
    assert report is not None
    assert (report.reporting_mta, report.envelope_id) == ("mx.receiver.test", MID)
    assert [(r.final_recipient, r.status) for r in report.recipients] == [
        ("nosuchuser@receiver.test", "5.1.1")
    ]


@pytest.mark.parametrize("blank", [b"", b" \t"])
@pytest.mark.parametrize("encoded", [False, True])
def test_a_blank_line_before_the_feedback_fields_loses_nothing(blank: bytes, encoded: bool) -> None:
    """The same at the start of a message/feedback-report part: every field was lost, so
    a not-spam report (RFC 6430) read as one without a Feedback-Type, which is taken for
    an abuse complaint, and it named no recipient nor its Original-Mail-From."""
    head = b"Content-Type: message/feedback-report\n\n"
    data = (
        sample("arf-complaint.eml")
        .replace(head, head + blank + b"\n")
        .replace(b"Feedback-Type: abuse", b"Feedback-Type: not-spam")
    )
    if encoded:
        data = _encoded_part(data, b"message/feedback-report", b"\n")
    report = parse_report(data)
    assert report is not None and report.feedback_type == "not-spam"
    assert report.reporting_mta == "fbl.mailbox.test"
    assert [r.final_recipient for r in report.recipients] == ["carol@mailbox.test"]
    assert f"bounces+{MID}-5d41402abc@sender.test" in report.envelope_senders


def _encoded_with_line_ends(data: bytes, part_type: bytes, line_end: bytes, inner: bytes) -> bytes:
    """``data`` with the body of its ``part_type`` part in base64, its lines ended with
    ``inner`` before they were encoded (``line_end`` is the report's own)."""
    head = b"Content-Type: " + part_type + line_end * 2
    start = data.index(head) + len(head)
    end = data.index(line_end + b"--", start)
    body = re.sub(rb"\r\n|\r|\n", inner, data[start:end]) + inner
    encoded = base64.encodebytes(body).replace(b"\n", line_end)
    return (
        data[: start - len(line_end)]
        + b"Content-Transfer-Encoding: base64"
        + line_end * 2
        + encoded
        + data[end:]
    )


@pytest.mark.parametrize("inner", [b"\r", b"\n", b"\r\n"], ids=["CR", "LF", "CRLF"])
@pytest.mark.parametrize(
    "part_type", [b"message/delivery-status", b"message/global-delivery-status"]
)
def test_an_encoded_status_part_is_read_whatever_its_line_ends(
    part_type: bytes, inner: bytes
) -> None:
    """Was: with its lines ended by a CR alone inside the base64 (as old Mac software, or
    a gateway that turned every CRLF into CR, writes them) the decoded part was one
    block: the parser ended its header at the first empty line, the recipient blocks
    became a body nobody read, and the report named no recipient, so the bounce was
    left unmatched. The parser ends a line at a CR alone too; so does the decoded part."""
    data = sample("postfix-dsn-headers.eml")
    if part_type != b"message/delivery-status":
        data = data.replace(b"Content-Type: message/delivery-status", b"Content-Type: " + part_type)
    report = parse_report(_encoded_with_line_ends(data, part_type, b"\r\n", inner))
    assert report is not None
    assert (report.reporting_mta, report.envelope_id) == ("mx.receiver.test", MID)
    assert [(r.final_recipient, r.action, r.status) for r in report.recipients] == [
        ("nosuchuser@receiver.test", "failed", "5.1.1")
    ]
    assert report.recipients[0].diagnostic == 'unknown user: "nosuchuser"'


@pytest.mark.parametrize("per_message", ["left out", "run into the first recipient's"])
def test_a_recipient_in_the_first_dsn_block_is_read(per_message: str) -> None:
    """RFC 3464 §2.1 puts the per-message fields first, in a block of their own; an MTA
    that leaves them out, or writes no blank line between them and the first recipient's
    fields, makes that recipient's fields the first block. It was read as the per-message
    block only: the recipient was lost (with one, the report named none, and a failure
    it reported was ignored as "action missing")."""
    block = b"Final-Recipient: rfc822; other@receiver.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
    data = sample("postfix-dsn-headers.eml").replace(
        b"\r\n\r\nFinal-Recipient:", b"\r\nFinal-Recipient:"
    )
    data = data.replace(b"Status: 5.1.1\r\n", b"Status: 5.1.1\r\n\r\n" + block)
    if per_message == "left out":
        start = data.index(b"Reporting-MTA:")
        data = data[:start] + data[data.index(b"Final-Recipient:") :]
    report = parse_report(data)
    assert report is not None
    assert [(r.final_recipient, r.action, r.status) for r in report.recipients] == [
        ("nosuchuser@receiver.test", "failed", "5.1.1"),
        ("other@receiver.test", "failed", "5.1.1"),
    ]
    if per_message != "left out":
        assert (report.reporting_mta, report.envelope_id) == ("mx.receiver.test", MID)


@pytest.mark.parametrize(
    ("template", "why"),
    [
        # Unquoted and unescaped, this is bounce{token}@...: a hex digit touches the token.
        ('"bounce\\{token}"@sender.test', "other than a hex digit"),
        # NFC writes U+0958 as two code points, 3 octets as 6: 80 octets with the token.
        ("\u0958" * 6 + "+{token}@sender.test", "at most 64"),
    ],
)
def test_a_template_is_checked_as_it_is_sent(template: str, why: str) -> None:
    """The template was checked as given, then normalized for sending (a quoted local
    part unquoted, a UTF-8 one in NFC): the envelope sender it queued could have a hex
    digit next to its token, so that no bounce to it ever matched, or a local part past
    RFC 5321's 64 octets."""
    from mailstrom import Config, Email, Mailstrom
    from mailstrom.stores import MemoryStore

    email = Email(from_="app@sender.test", to=["bob@example.org"], subject="Hi", text="Hello")
    store = MemoryStore()
    with Mailstrom(Config(helo_name="mail.sender.test"), store=store, worker=None) as ms:
        with pytest.raises(InvalidAddress, match=why):
            ms.send_email(email, envelope_from=template)
        assert ms.query_recent() == []


@pytest.mark.parametrize(
    "template", ["bounces+{token}\udcff@sender.test", "bounces+{token}@sender\udcff.test"]
)
def test_a_template_with_a_lone_surrogate_is_a_typed_error(template: str) -> None:
    """A template's octets were counted with a strict UTF-8 encoding: a lone surrogate
    (a string decoded with "surrogateescape") raised UnicodeEncodeError, where the same
    envelope sender without {token} is refused as ForbiddenCharacter, and nothing is
    queued."""
    from mailstrom import Config, Email, Mailstrom
    from mailstrom.errors import ForbiddenCharacter
    from mailstrom.stores import MemoryStore

    email = Email(from_="app@sender.test", to=["bob@example.org"], subject="Hi", text="Hello")
    with Mailstrom(Config(helo_name="mail.sender.test"), store=MemoryStore(), worker=None) as ms:
        with pytest.raises(ForbiddenCharacter, match="lone surrogate"):
            ms.send_email(email, envelope_from=template)
        assert ms.query_recent() == []


@pytest.mark.parametrize(
    ("name", "part_type"),
    [
        ("postfix-dsn-headers.eml", b"text/rfc822-headers"),
        ("postfix-dsn-full.eml", b"message/rfc822"),
        ("arf-complaint.eml", b"text/rfc822-headers"),
    ],
)
@pytest.mark.parametrize("encoded", [False, True])
def test_a_blank_line_before_the_returned_headers_loses_nothing(
    name: str, part_type: bytes, encoded: bool
) -> None:
    """A blank line at the start of the returned message's part ended its header
    section before it began: its Message-ID (what matches mail sent without VERP when
    the report has no Original-Envelope-Id) and its Return-Path (where a VERP token is
    looked for) were read as its body."""
    data = sample(name).replace(b"Content-Transfer-Encoding: 8bit", b"X-Encoding: none")
    nl = b"\r\n" if b"\r\n" in data else b"\n"
    body_start = data.index(nl * 2, data.index(b"Content-Type: " + part_type)) + 2 * len(nl)
    body_end = data.index(nl + b"--", body_start)
    head, body, tail = data[: body_start - len(nl)], data[body_start:body_end], data[body_end:]

    def report_with(body: bytes) -> bytes:
        if not encoded:
            return head + nl + body + tail
        encoding = b"Content-Transfer-Encoding: base64" + nl * 2
        return head + encoding + base64.encodebytes(body).replace(b"\n", nl) + tail

    report = parse_report(report_with(body))
    assert report is not None and report.original_message_id is not None
    assert parse_report(report_with(nl + body)) == report


@pytest.mark.parametrize("name", ["postfix-dsn-headers.eml", "arf-complaint.eml"])
def test_a_report_whose_lines_end_with_a_cr_alone_reads_as_with_crlf(name: str) -> None:
    """The parser ends a line at a CR alone too (old Mac software, or a gateway that
    turned every CRLF into CR). Was: a folded address field kept the CR of its fold, made
    U+FFFD ("\\ufffd  nosuchuser@receiver.test"), so the recipient matched nothing; and
    a blank line before the returned headers was not seen as one, so the Message-ID and
    Return-Path were read as the body."""
    data = re.sub(rb"\r?\n", b"\r\n", sample(name))
    for field in (b"Final-Recipient", b"Original-Recipient", b"X-Postfix-Sender"):
        data = data.replace(field + b": rfc822;", field + b": rfc822;\r\n  ")
    data = data.replace(b"Original-Rcpt-To: ", b"Original-Rcpt-To:\r\n\t")
    data = data.replace(b"Original-Mail-From: ", b"Original-Mail-From:\r\n ")
    head = b"Content-Type: text/rfc822-headers\r\n\r\n"
    data = data.replace(head, head + b"\r\n")
    with_crlf = parse_report(data)
    assert with_crlf is not None and with_crlf.original_message_id is not None
    assert with_crlf.recipients[0].final_recipient in (
        "nosuchuser@receiver.test",
        "carol@mailbox.test",
    )
    assert parse_report(data.replace(b"\r\n", b"\r")) == with_crlf


def test_a_template_whose_address_would_pass_254_octets_with_its_token_is_refused() -> None:
    """A template is an address of its own length, and the token adds 36 octets to it.
    Was: a template of 246 octets (a long domain) was queued, and every recipient's
    envelope sender went out as 282 octets, past RFC 5321's 256-octet path
    (§4.5.3.1.3), where a server may refuse MAIL FROM and fail the message."""
    from mailstrom import Config, Email, Mailstrom
    from mailstrom.message.addrspec import validate_address
    from mailstrom.stores import MemoryStore

    domain = ".".join(["a" * 63] * 3) + "." + "b" * 30 + ".example"
    template = f"bounces+{{token}}@{domain}"
    validate_address(template)  # 246 octets: an address in itself
    with pytest.raises(InvalidAddress):
        validate_address(verp_address(template, MID, "bob@example.org", key=KEY))
    with pytest.raises(InvalidAddress, match="282 octets with its token; at most 254"):
        check_verp_template(template)
    fits = template.replace("b" * 30, "b" * 2)  # 254 octets with its token
    check_verp_template(fits)
    validate_address(verp_address(fits, MID, "bob@example.org", key=KEY))
    email = Email(from_="app@sender.test", to=["bob@example.org"], subject="Hi", text="Hello")
    store = MemoryStore()
    with Mailstrom(Config(helo_name="mail.sender.test"), store=store, worker=None) as ms:
        with pytest.raises(InvalidAddress, match="at most 254"):
            ms.send_email(email, envelope_from=template)
        assert ms.query_recent() == []


def test_the_content_type_fields_of_a_report_are_bounded_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each Content-Type field is bounded (MAX_CONTENT_TYPE), but a report may hold
    thousands. Was: ten megabytes of parts, each a multipart whose boundary parameter is
    4,000 characters of semicolons in quotes (each read by the standard library in time
    quadratic in its length), took 24 s of CPU to parse. The fields past a total bound
    are cut off with the rest of the report, as lines past MAX_LINES are: the report's
    own parts come first and still read. Counted here (the characters of parameters the
    standard library reads), not timed."""
    read = 0
    real = email.message._parseparam  # type: ignore[attr-defined]

    def counting(text: str) -> list[str]:
        nonlocal read
        read += len(text)
        result: list[str] = real(text)
        return result

    monkeypatch.setattr(email.message, "_parseparam", counting)
    boundary = b"--84C842307B3.1796054555/mx.receiver.test"
    sibling = b'%s\r\nContent-Type: multipart/mixed; boundary="%s"\r\n\r\nx\r\n' % (
        boundary,
        b";" * (MAX_CONTENT_TYPE - 60),
    )
    data = sample("postfix-dsn-headers.eml").replace(
        boundary + b"--", sibling * 2_000 + boundary + b"--"
    )
    report = parse_report(data)
    assert report is not None and report.recipients[0].status == "5.1.1"
    assert report.original_message_id == "<sample-1@sender.test>"
    assert read <= 2 * MAX_CONTENT_TYPES, read

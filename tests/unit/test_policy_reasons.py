"""Reply classes (policy/reasons.py over reasons.toml): the data file, the lookup order,
the RFC 3463 and basic-code fallbacks, and the advice shown to people."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from importlib import resources

import pytest

from mailstrom.policy import advice, advice_for, classify_local, classify_reply
from mailstrom.policy.reasons import DATA_FILE, ReplyRule, load_table, table
from mailstrom.smtp.replies import ReplyParser
from mailstrom.status import Attempt, AttemptOutcome, ReasonClass, SMTPReply

RULES = table().rules


def parse(wire: str) -> SMTPReply:
    """A reply as the session would see it: ``wire`` lines sent with CRLF."""
    parser = ReplyParser()
    parser.feed(wire.replace("\n", "\r\n").encode() + b"\r\n")
    reply = parser.next_reply()
    assert reply is not None
    return reply


def rule_id(rule: ReplyRule) -> str:
    return f"{rule.index + 1}-{rule.provider or 'any'}-{rule.example[:24]}"


# --- the data file ----------------------------------------------------------------------------


def test_the_data_file_is_package_data_and_loads() -> None:
    assert resources.files("mailstrom.policy").joinpath(DATA_FILE).is_file()
    t = load_table()
    assert len(t.rules) == len(RULES) > 40
    assert set(t.classes) == set(ReasonClass)


@pytest.mark.parametrize("rule", RULES, ids=rule_id)
def test_every_rule_classifies_its_own_example_and_no_earlier_rule_takes_it(
    rule: ReplyRule,
) -> None:
    reply = parse(rule.example)
    assert reply.code in rule.codes
    if rule.enhanced:
        assert reply.enhanced in rule.enhanced
    assert table().match(reply) is rule  # reachable: not shadowed by an earlier rule
    assert classify_reply(reply) is rule.reason_class
    found = advice(rule.reason_class, reply)
    assert (found.provider, found.help, found.action) == (rule.provider, rule.help, rule.action)


@pytest.mark.parametrize("rule", RULES, ids=rule_id)
def test_every_rule_is_complete(rule: ReplyRule) -> None:
    assert rule.action and "\n" not in rule.action
    assert rule.help is None or rule.help.startswith("https://")
    if rule.provider is not None:
        assert rule.help is not None, "a provider's rule links to the provider's page"
    if rule.enhanced:
        # An enhanced code belongs to the class of the reply code it is listed with.
        assert {e[0] for e in rule.enhanced} <= {str(c)[0] for c in rule.codes}


def test_every_class_is_reachable_from_some_reply_or_fallback() -> None:
    t = table()
    reachable = {r.reason_class for r in t.rules}
    reachable |= set(t.details.values()) | set(t.subjects.values()) | set(t.codes.values())
    reachable |= set(t.local.values()) | {ReasonClass.OTHER}
    # CONNECTION also comes from errors without a reply (runtime.outcomes); EXPIRED only
    # from the message's own expiry, SUPPRESSED only from the worker's suppression check
    # and LOCAL only from this host's own shortage (its error's type), never from a reply.
    unreplied = {ReasonClass.EXPIRED, ReasonClass.SUPPRESSED, ReasonClass.LOCAL}
    assert reachable | unreplied == set(ReasonClass)


GOOD = """
[classes]
{classes}
[[reply]]
code = 550
enhanced = "5.7.1"
class = "policy"
action = "do something"
example = "550 5.7.1 no"
"""


def document(rule_extra: str = "", tail: str = "") -> str:
    classes = "\n".join(f'{c.value} = {{ meaning = "m", action = "a" }}' for c in ReasonClass)
    return GOOD.format(classes=classes) + rule_extra + "\n" + tail


def test_a_minimal_document_loads() -> None:
    t = load_table(document())
    assert t.by_key[(550, "5.7.1")][0].reason_class is ReasonClass.POLICY


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        (document('colour = "red"'), "unknown keys"),
        (document().replace('class = "policy"', 'class = "polite"'), "unknown class"),
        (document().replace("code = 550", "code = 650"), "no reply code"),
        (document().replace('enhanced = "5.7.1"', 'enhanced = "5.7"'), "no enhanced code"),
        (document().replace('enhanced = "5.7.1"', 'enhanced = "4.7.9-3"'), "no enhanced code"),
        (document("pattern = '(unclosed'"), "bad pattern"),
        (document('help = "http://example.com/"'), "https"),
        (document().replace('action = "do something"\n', ""), "action is missing"),
        (document().replace("other = {", "# other = {"), "lacks"),
        (document(tail='[enhanced]\n"7" = "policy"'), "subject.detail"),
        (document(tail='[codes]\n"5x0" = "mailbox"'), "no reply code"),
        (document(tail="[extras]\nx = 1"), "unknown tables"),
    ],
)
def test_a_malformed_document_is_refused_with_its_reason(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=re.escape(complaint)):
        load_table(text)


def test_ranges_expand_to_every_code() -> None:
    t = load_table(document().replace('enhanced = "5.7.1"', 'enhanced = "5.7.606-649"'))
    assert {e for (_, e) in t.by_key} == {f"5.7.{n}" for n in range(606, 650)}


# --- lookup order -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        # RFC 3463 subject.detail, from servers no rule knows.
        ("550 5.1.1 <bob@example.org>: Recipient address rejected: User unknown", "mailbox"),
        ("552 5.2.2 Mailbox full", "mailbox"),
        ("550 5.2.1 Mailbox disabled", "mailbox"),
        ("552 5.3.4 Message too big for system", "content"),
        ("451 4.4.3 Directory server failure", "dns"),
        ("550 5.1.10 Recipient domain has null MX", "routing"),
        ("550 5.7.26 Multiple authentication checks failed", "authentication"),
        ("550 5.7.25 Reverse DNS validation failed", "authentication"),
        ("550 5.7.23 SPF validation failed", "authentication"),
        ("421 4.7.28 Flood of mail from your host", "rate_limited"),
        ("530 5.7.11 Encryption required for requested authentication mechanism", "tls"),
        ("553 5.6.7 Non-ASCII addresses not permitted", "protocol"),
        ("452 4.5.3 Too many recipients", "protocol"),
        ("421 4.4.5 Mail system congestion", "system"),
        ("535 5.7.8 Authentication credentials invalid", "authentication"),
        # Vague enhanced codes: the subject decides when no heuristic does.
        ("554 5.7.1 Refused by local rule 17", "policy"),
        ("550 5.7.0 Go away", "policy"),
        ("550 5.6.0 Refused", "content"),
        ("451 4.3.0 Try later", "system"),
        # Nothing in the enhanced code (X.0.0 or none): the basic code.
        ("550 5.0.0 Refused", "mailbox"),
        ("451 4.0.0 Later", "system"),
        ("421 mx.example.org Service not available, closing transmission channel", "system"),
        ("550 Requested action not taken", "mailbox"),
        ("500 Syntax error, command unrecognized", "protocol"),
        ("535 Authentication failed", "authentication"),
        ("556 Domain does not accept mail", "routing"),
        ("554 Transaction failed", "other"),
        ("459 Something new", "other"),
        ("354 Go ahead", "protocol"),  # a positive reply where a failure was decided
    ],
)
def test_fallbacks_by_enhanced_code_then_basic_code(wire: str, expected: str) -> None:
    assert classify_reply(parse(wire)) is ReasonClass(expected)


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (
            "451 4.7.500 Server busy. Please try again later from [192.0.2.1]. (S77719)",
            "rate_limited",
        ),
        (
            "421 4.7.500 Server busy. Please try again later from [192.0.2.1]. (S77719)",
            "rate_limited",
        ),
        ("421 4.7.500 Server busy, please try again later.", "rate_limited"),
        (
            "421 4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP"
            " reputation. For e-mail delivery information, see https://postmaster.live.com (S775)",
            "reputation",
        ),
        (
            "421 4.7.651 The mail server [192.0.2.1] has been temporarily rate limited due to IP"
            " reputation. For e-mail delivery information, see https://postmaster.live.com (S3114)",
            "reputation",
        ),
    ],
)
def test_microsoft_s_rate_limits_are_known_with_a_421_as_with_a_451(
    wire: str, expected: str
) -> None:
    # Was: only "451 4.7.500-699" was Microsoft's; the same codes with a 421, which
    # Exchange Online sends too ("421 4.7.500 Server busy"), fell through to the subject
    # of 4.7.x and were "policy", so a 421 4.7.500 to MAIL or RCPT paused nothing.
    reply = parse(wire)
    assert classify_reply(reply) is ReasonClass(expected)
    assert advice(ReasonClass(expected), reply).provider == "Microsoft"


def test_a_telling_enhanced_code_beats_the_text_heuristics() -> None:
    assert classify_reply(parse("550 5.1.1 Unknown user; looks like spam")) is ReasonClass.MAILBOX
    # A vague one (X.7.1) leaves it to the text.
    assert classify_reply(parse("550 5.7.1 Looks like spam")) is ReasonClass.CONTENT


def test_text_is_compared_case_insensitively_and_across_lines() -> None:
    assert classify_reply(parse("451 4.7.1 GREYLISTED")) is ReasonClass.GREYLISTED
    gmail = parse(
        "421-4.7.0 TLS\n421-4.7.0 required for RCPT domain, closing connection.\n"
        "421 4.7.0 a1si2 - gsmtp"
    )
    assert gmail.enhanced == "4.7.0"
    assert classify_reply(gmail) is ReasonClass.TLS
    assert advice(ReasonClass.TLS, gmail).provider == "Google"


def test_a_wrapped_reply_s_spacing_does_not_hide_a_phrase() -> None:
    # Was: only line breaks became spaces, while the rules' phrases are stored with their
    # whitespace collapsed; a line that ends in a space (servers that wrap at a fixed
    # width leave one), a tab or a run of spaces kept the phrase from matching, and
    # Gmail's TLS refusal read as a vague policy one.
    for wire in (
        "421-4.7.0 TLS \n421 4.7.0 required for RCPT domain, closing connection. - gsmtp",
        "421 4.7.0 TLS\trequired for RCPT domain, closing connection. - gsmtp",
        "421 4.7.0 TLS  required for RCPT domain, closing connection. - gsmtp",
    ):
        reply = parse(wire)
        assert classify_reply(reply) is ReasonClass.TLS, wire
        assert advice(ReasonClass.TLS, reply).provider == "Google", wire
    wrapped = parse("421-4.7.0 Temporary System \n421 4.7.0 Problem. Try again later. - gsmtp")
    assert classify_reply(wrapped) is ReasonClass.SYSTEM


def test_a_provider_rule_needs_the_providers_marker() -> None:
    gmail = parse("550 5.7.26 Unauthenticated sender. a1si2 - gsmtp")
    other = parse("550 5.7.26 Unauthenticated sender")
    assert classify_reply(gmail) is classify_reply(other) is ReasonClass.AUTHENTICATION
    assert advice(ReasonClass.AUTHENTICATION, gmail).provider == "Google"
    plain = advice(ReasonClass.AUTHENTICATION, other)
    assert (plain.provider, plain.help) == (None, None)
    assert plain.action == table().classes[ReasonClass.AUTHENTICATION].action


def test_the_brief_s_well_known_replies() -> None:
    cases = {
        "421 4.7.28 Unusual rate of unsolicited mail. - gsmtp": "rate_limited",
        "550 5.7.26 Unauthenticated email is not accepted. - gsmtp": "authentication",
        "550 5.7.27 SPF did not pass. - gsmtp": "authentication",
        "421 4.7.0 TLS required for RCPT domain. - gsmtp": "tls",
        "550 5.7.1 Policy refusal. - gsmtp": "policy",
        "451 4.7.650 Rate limited due to IP reputation. (S775)": "reputation",
        "550 5.7.1 Part of their network is on our block list (S3150).": "reputation",
        "550 5.7.708 Access denied, traffic not accepted from this IP.": "reputation",
        "550 5.7.750 Client blocked from sending from unregistered domains.": "policy",
        "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred.": "rate_limited",
        "554 5.7.9 Message not accepted for policy reasons.": "authentication",
    }
    for wire, expected in cases.items():
        assert classify_reply(parse(wire)) is ReasonClass(expected), wire


# --- failures without a reply -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("enhanced", "expected"),
    [
        (None, "other"),
        ("4.4.3", "dns"),  # SERVFAIL or a timeout of our own lookup
        ("5.1.2", "dns"),  # NXDOMAIN, or no valid domain name
        ("4.4.4", "routing"),  # no MX host has an address
        ("5.4.4", "routing"),  # every address refused (loopback...)
        ("5.1.3", "mailbox"),  # a recipient SMTP cannot carry
        ("5.1.7", "mailbox"),  # an envelope sender SMTP cannot carry
    ],
)
def test_local_failures_by_enhanced_code(enhanced: str | None, expected: str) -> None:
    assert classify_local(enhanced) is ReasonClass(expected)


# --- advice -----------------------------------------------------------------------------------


def test_advice_without_a_reply_is_the_class_s() -> None:
    found = advice(ReasonClass.GREYLISTED)
    info = table().classes[ReasonClass.GREYLISTED]
    assert (found.meaning, found.action, found.help, found.provider) == (
        info.meaning,
        info.action,
        None,
        None,
    )


def test_advice_for_a_stored_class_the_rule_disagrees_with_is_the_stored_class_s() -> None:
    # Recorded by another version of the table: the class shown is the one stored.
    reply = parse("550 5.1.1 No such account. - gsmtp")
    found = advice(ReasonClass.POLICY, reply)
    assert found.reason_class is ReasonClass.POLICY and found.provider is None


def test_advice_for_an_attempt_or_recipient() -> None:
    at = datetime(2030, 1, 1, tzinfo=UTC)
    delivered = Attempt(at=at, outcome=AttemptOutcome.DELIVERED)
    assert advice_for(delivered) is None
    failed = Attempt(
        at=at,
        outcome=AttemptOutcome.PERMANENT,
        reply=parse("550 5.1.1 No such account. - gsmtp"),
        reason_class=ReasonClass.MAILBOX,
    )
    found = advice_for(failed)
    assert found is not None
    assert found.help == "https://support.google.com/mail/?p=NoSuchUser"


# --- families of replies any server sends -----------------------------------------------------


@pytest.mark.parametrize(
    "wire",
    [
        # Exim's smtp_accept_max and smtp_accept_max_per_host; Amazon SES.
        "421 mx.example.org: Too many concurrent SMTP connections; please try again later.",
        "421 Too many concurrent SMTP connections from this IP address; please try again later.",
        "421 Too many concurrent SMTP connections",
        # Postfix anvil: connection count and rate, message rate, recipient rate.
        "421 4.7.0 mx.example.org Error: too many connections from 192.0.2.1",
        "450 4.7.1 Error: too much mail from 192.0.2.1",
        "450 4.7.1 Error: too many recipients from 192.0.2.1",
        "421 4.7.0 Connection rate limit exceeded",
        # Exchange Server's per-source limit, with X.3.2 ("not accepting network messages").
        "421 4.3.2 The maximum number of concurrent server connections has exceeded a limit,"
        " closing transmission channel",
        "421 4.7.0 Too many concurrent SMTP connections",
        "421 4.3.2 Too many connections, try again later",
        # Outlook.com's hourly and daily limits (no enhanced code: was "system").
        "421 RP-001 (BAY004-MC1F63) Unfortunately, some messages from 192.0.2.1 weren't sent."
        " Please try again. We have limits for how many messages can be sent per hour and per"
        " day.",
        "450 4.7.1 Too many messages per hour from this sender",
    ],
)
def test_too_many_connections_or_too_much_mail_is_rate_limited(wire: str) -> None:
    # Was: a 421 without an enhanced code was "system" (the basic code), a 4.7.x one
    # "policy" (the subject) unless its words were exactly "too many connections".
    assert classify_reply(parse(wire)) is ReasonClass.RATE_LIMITED


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ("421 too many messages in this connection", "connection"),
        ("452 4.5.3 Too many recipients", "protocol"),
        ("421 4.3.2 Service not available, closing transmission channel", "system"),
        ("451 4.3.2 Please try again later", "system"),
    ],
)
def test_the_limits_that_are_not_rates_keep_their_class(wire: str, expected: str) -> None:
    assert classify_reply(parse(wire)) is ReasonClass(expected)


@pytest.mark.parametrize(
    "wire",
    [
        # Postfix: an access map's REJECT, as smtpd words it for the RCPT stage.
        "554 5.7.1 <bob@example.org>: Recipient address rejected: Access denied",
        "550 5.7.1 <bob@example.org>: Recipient address rejected: Access denied",
        "554 <bob@example.org>: Recipient address rejected: Access denied",
        # Exim: an ACL's deny without a message of its own.
        "550 Administrative prohibition",
    ],
)
def test_an_access_rule_s_refusal_is_policy(wire: str) -> None:
    # Was "mailbox": "Recipient address rejected" names the stage of a Postfix refusal, not
    # its reason, and the mailbox heuristic took it for one; Exim's words matched nothing
    # and the basic code 550 said mailbox. Users were told to drop a working address.
    assert classify_reply(parse(wire)) is ReasonClass.POLICY


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (
            "550 5.1.1 <bob@example.org>: Recipient address rejected: User unknown in virtual"
            " mailbox table",
            "mailbox",
        ),
        (
            "550 <bob@example.org>: Recipient address rejected: User unknown in local recipient"
            " table",
            "mailbox",
        ),
        (
            "550 5.1.0 <bob@example.org>: Recipient address rejected: undeliverable address:"
            " No such user here.",
            "mailbox",
        ),
        ("450 4.1.2 <bob@example.org>: Recipient address rejected: Domain not found", "routing"),
        (
            "450 4.2.0 <bob@example.org>: Recipient address rejected: Greylisted, see"
            " http://postgrey.schweikert.ch/help/example.org.html",
            "greylisted",
        ),
        # Microsoft's directory-based edge blocking: no such recipient, in Postfix's words.
        (
            "550 5.4.1 Recipient address rejected: Access denied. AS(201806281)"
            " [DB5EUR03FT012.eop-EUR03.prod.protection.outlook.com]",
            "mailbox",
        ),
    ],
)
def test_a_recipient_refusal_keeps_the_class_of_its_reason(wire: str, expected: str) -> None:
    assert classify_reply(parse(wire)) is ReasonClass(expected)


@pytest.mark.parametrize(
    "wire",
    [
        # qmail (its code in words only; the "(#5.7.1)" is no RFC 2034 enhanced code).
        "553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)",
        # vpopmail's chkuser, with a code of its own.
        "553 sorry, that domain isn't in my list of allowed rcpthosts (#5.5.3 - chkuser)",
        "550 we do not relay",
        "550 5.7.1 Sender is not allowed to relay",
        "554 5.7.1 <bob@example.org>: Relay access denied",
        "550 relay not permitted",
        "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain",
    ],
)
def test_a_refusal_to_relay_is_policy(wire: str) -> None:
    # Was "mailbox" for the first three: the relaying heuristic knew neither qmail's
    # words nor "do not relay", and the basic code 553 or 550 decided.
    assert classify_reply(parse(wire)) is ReasonClass.POLICY
    assert "MX records" in advice(ReasonClass.POLICY, parse(wire)).action


@pytest.mark.parametrize(
    "wire",
    [
        "550 5.7.1 Sender address does not exist",
        "550 Sender verify failed",
        # Exim: the sender's domain routes nowhere, or its server refused the callout (whose
        # answer, quoted, speaks of an unknown user: the sender, not the recipient).
        "550-Verification failed for <app@example.com>\n550-Unrouteable address\n"
        "550 Sender verify failed",
        "550-Verification failed for <app@example.com>\n550-Called:   192.0.2.1\n"
        "550-Sent:     RCPT TO:<app@example.com>\n"
        "550-Response: 550 5.1.1 <app@example.com>: Recipient address rejected: User unknown"
        " in local recipient table\n550 Sender verify failed",
        "451 Could not complete sender verify callout",
        # Postfix: reject_unverified_sender (X.1.7, "bad sender's mailbox address"), and
        # reject_unlisted_sender.
        "450 4.1.7 <app@example.com>: Sender address rejected: unverified address: connect to"
        " mail.example.com[192.0.2.1]:25: Connection refused",
        "550 5.1.0 <app@example.com>: Sender address rejected: User unknown in virtual mailbox"
        " table",
        # Gmail, and Sendmail without an enhanced code.
        "553-5.1.7 The sender address <app@example> is not a valid\n"
        "553 5.1.7 RFC-5321 address. - gsmtp",
        "553 <app@example.com>... Domain of sender address app@example.com does not exist",
    ],
)
def test_a_failure_of_the_sender_address_is_not_the_recipient_s(wire: str) -> None:
    # Was "mailbox", whose advice is to remove the recipient's address: the sender's
    # address is what the receiver could not verify.
    reply = parse(wire)
    assert classify_reply(reply) is ReasonClass.AUTHENTICATION
    assert "sender" in advice(ReasonClass.AUTHENTICATION, reply).action


@pytest.mark.parametrize(
    "wire",
    [
        # Postfix's reject_unknown_sender_domain, temporary and permanent; Sendmail's.
        "450 4.1.8 <app@example.com>: Sender address rejected: Domain not found",
        "550 5.1.8 <app@example.com>: Sender address rejected: Domain not found",
        "553 5.1.8 <app@example.com>... Domain of sender address app@example.com does not exist",
        "451 4.1.8 Domain of sender address app@example.com does not resolve",
    ],
)
def test_a_sender_domain_the_receiver_cannot_find_is_advised_as_the_sender_s(wire: str) -> None:
    """X.1.8 is "bad sender's system address" (RFC 3463): the receiver's DNS lookup of the
    envelope sender's domain found nothing. The class says a DNS lookup failed, but its
    advice sent the user to the recipient's address and mailstrom's own resolver ("Check
    the domain in the address, and that the resolver in Config.dns answers"), neither of
    which any lookup of ours was about."""
    reply = parse(wire)
    reason_class = classify_reply(reply)
    assert reason_class is ReasonClass.DNS
    action = advice(reason_class, reply).action
    assert "sender" in action, action
    assert "Config.dns" not in action, action


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ("550 5.7.1 <app@example.com>: Sender address rejected: Access denied", "policy"),
        ("450 4.1.8 <app@example.com>: Sender address rejected: Domain not found", "dns"),
        ("550 5.7.1 Sender is not allowed to relay", "policy"),
    ],
)
def test_other_refusals_naming_the_sender_keep_their_class(wire: str, expected: str) -> None:
    assert classify_reply(parse(wire)) is ReasonClass(expected)


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        # qmail-smtpd gives its status code in words, at the end: no RFC 2034 code.
        ("552 sorry, that message size exceeds my databytes limit (#5.3.4)", "content"),
        ("553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)", "policy"),
        ("554 too many hops, this message is looping (#5.4.6)", "routing"),
        ("451 qq temporary problem (#4.3.0)", "system"),
        ("550 sorry, no mailbox here by that name. (#5.1.1)", "mailbox"),
        ("553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)", "policy"),
        # A code of another class than the reply's is no status of it.
        ("550 sorry, that message size exceeds my databytes limit (#4.3.4)", "mailbox"),
        # A real enhanced code wins over anything in the text.
        ("552 5.2.2 over quota (#5.3.4)", "mailbox"),
    ],
)
def test_qmail_s_status_code_at_the_end_of_its_reply_counts(wire: str, expected: str) -> None:
    # Was: the code in parentheses was ignored and the basic code decided: "552 ...
    # databytes limit" (a message too big) was mailbox, a badmailfrom refusal mailbox,
    # a mail loop "other".
    assert classify_reply(parse(wire)) is ReasonClass(expected)

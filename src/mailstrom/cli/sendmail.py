"""``mailstrom sendmail``: a drop-in for ``/usr/sbin/sendmail`` as programs call it.

It reads one message on stdin and only enqueues it (a ``mailstrom worker`` delivers), exiting
with sendmail's codes (sysexits). Flags follow Sendmail 8 and Postfix's ``sendmail(1)``;
options end at the first recipient argument, as with getopt.

Programs build sendmail command lines from data they were given (a sender address from a
web form), so this personality takes sendmail's own options only — no ``--store`` or
``--config`` that an injected argument could use to write the queue, i.e. attacker text,
to a file of its choosing (the PHPMailer CVE-2016-10033 pattern) — and reads its
configuration from fixed places only: ``$MAILSTROM_CONFIG`` or ``/etc/mailstrom/config.toml``
and the ``MAILSTROM_*`` variables, as Postfix's sendmail reads only its ``main.cf``
(``$MAIL_CONFIG`` aside).
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import dataclasses
import getpass
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser

from mailstrom.cli.context import report, require_lasting_store, store_from, utc_now
from mailstrom.cli.exits import (
    EX_DATAERR,
    EX_INTERRUPTED,
    EX_NOINPUT,
    EX_OK,
    EX_USAGE,
    CLIError,
    UsageError,
    fail,
    reader_gone,
    reason_for,
    say,
)
from mailstrom.cli.localnames import (
    REWRITTEN_HEADERS,
    address_field,
    aliases_path,
    default_origin,
    expand,
    expand_all,
    format_address,
    host_name,
    is_bare,
    qualify,
    qualify_headers,
    read_aliases,
    unlocal,
)
from mailstrom.cli.output import ReaderGone, end_with_reader
from mailstrom.cli.parsing import Subparsers
from mailstrom.cli.reading import LineReadable, read_limited, read_until_dot, stdin_buffer
from mailstrom.cli.trace import SMTPArrival, received_field
from mailstrom.errors import ConfigError, InvalidAddress, InvalidMessage, TooManyRecipients
from mailstrom.message import mime
from mailstrom.message.addresses import Mailbox, parse_local_address_list, parse_mailbox
from mailstrom.message.bounds import MAX_HEADER_SECTION
from mailstrom.message.chars import check_header_text, shorten
from mailstrom.message.dsn import DSN
from mailstrom.message.encoding import MAX_LINE, encode_long_lines, fold_line, to_crlf
from mailstrom.message.envelope import DEFAULT_MAX_RECIPIENTS, MailboxCount, newest_block_end
from mailstrom.message.headers import Field, HeaderSection, split_header_section
from mailstrom.message.stdlib_addresses import address_pairs
from mailstrom.message.words import unstructured_field
from mailstrom.settings import (
    CONFIG_PATH_ENV,
    SYSTEM_CONFIG_PATH,
    Settings,
    load_settings,
    mail_domain_problem,
)

HELP = """\
usage: mailstrom sendmail [-t] [-i] [-f ADDR] [-F NAME] [options] [RECIPIENT ...]
       sendmail [same]                 (installed as a symlink named "sendmail")

Read one RFC 5322 message on standard input and queue it for delivery; a running
"mailstrom worker" delivers it. Prints nothing on success.

  -t              recipients also from the To, Cc and Bcc headers (Bcc is never sent),
                  or the Resent-To, -Cc and -Bcc headers of a resent message
  -f ADDR, -r ADDR
                  envelope sender (default: taken from the From header)
  -F NAME         full name for the From header, when the message has none
  -i, -oi         a line with a single dot does not end the message
  -bp             list the pending queue (as mailq, or `mailstrom queue`) and exit
  -N DSN          delivery status notifications: never, or a comma-separated list of
                  success, failure, delay (RFC 3461 NOTIFY; only to servers offering DSN)
  -R RET          full or hdrs: what a failure report returns (RFC 3461 RET)
  -V ENVID        envelope id quoted by reports (default, with -N or -R: the message id)
  --help          show this help

Bare local names (root, www-data, "From: root (Cron Daemon)") get the origin domain
(setting sendmail.origin, default the host's fully qualified name, or helo_name when
that name is no public mail domain); recipients that are bare names are first looked
up in the aliases file (sendmail.aliases, default /etc/aliases when it exists; "name:
address, address" lines).

Configuration comes only from $MAILSTROM_CONFIG or /etc/mailstrom/config.toml and the
MAILSTROM_* environment variables; mailstrom's own options (--store, --config, ...) are
refused here, before or after "sendmail".

Options may be clustered as getopt reads them: -ti, -tif ADDR (the last may take a value).
  -bs             speak SMTP on standard input and output (as Laravel and Symfony
                  Mailer call it): each message is queued with the envelope of MAIL
                  FROM and RCPT TO; -f and -i are then ignored, -t and
                  recipient arguments refused (as with -bp)
  -bm             queue the message (the default); of -bm, -bp, -bs the last one wins
Other modes (-bd, -bi, -bt, -bv, -q...) are refused.
Accepted and ignored, for compatibility: -odb -odi -oem -oee -om -o* -v -U -G -n
-m, and -A -B -C -d -e -X -L -O -h -p with their value (-Am, -d0.1, -e m).

exit codes: 0 queued, 64 usage, 65 bad message or address, 66 no input (none, or
unreadable), 70 internal error, 73 -bs output cannot be written, 74 store damaged
(retrying will not help), 75 store unavailable (try again) or -bs timed out, 76 -bs
session ended for protocol errors, 78 bad configuration.
"""

_FLAGS = frozenset("timnvUG")
"""Single-letter flags without a value (may be clustered: ``-ti``)."""
_IGNORED_WITH_VALUE = frozenset("BCXLOhpdAe")
"""Options whose value is accepted (attached or next argument) and ignored: as getopt
reads Sendmail's and Postfix's option strings, ``-d``, ``-A`` and ``-e`` take one too."""
_WITH_VALUE = frozenset("frFNRVob") | _IGNORED_WITH_VALUE
"""Every option letter that takes a value: the rest of its argument, else the next one."""
_UNSUPPORTED_MODES = {
    "bd": "run `mailstrom worker` instead",
    "bD": "run `mailstrom worker` instead",
    "bi": "aliases are read as they are; there is no database to build",
    "bv": "use `mailstrom check DOMAIN`",
    "q": "run `mailstrom worker --once`",
    "bt": "there is no address test mode; `mailstrom check DOMAIN` tests a domain",
}
_MODES = frozenset({"bm", "bp", "bs"})
"""The ``-b`` modes run: deliver (queue) the message, list the queue, and SMTP on
standard input and output (:mod:`mailstrom.cli.sendmail_smtp`). Any other
(``-bt`` address test mode, ``-bv``, ``-bh``, ``-bP``...) is refused, never taken as
``-bm``."""


@dataclass(slots=True)
class SendmailArgs:
    extract: bool = False
    sender: str | None = None
    full_name: str | None = None
    ignore_dots: bool = False
    recipients: list[str] = field(default_factory=list)
    help: bool = False
    list_queue: bool = False
    """-bp: print the queue, as mailq does."""
    smtp: bool = False
    """-bs: speak SMTP on standard input and output (the last -b mode given counts)."""

    notify: str | None = None
    ret: str | None = None
    envid: str | None = None

    def dsn(self) -> DSN | None:
        """The DSN request of -N, -R and -V, if any was given; UsageError when invalid."""
        try:
            return DSN.from_options(self.notify, self.ret, self.envid)
        except InvalidMessage as exc:
            raise UsageError(str(exc).replace("dsn: ", "-N/-R/-V: ")) from None


def parse_args(argv: Sequence[str]) -> SendmailArgs:
    """sendmail's command line → :class:`SendmailArgs`; UsageError on nonsense."""
    args = SendmailArgs()
    i = 0

    def value(arg: str, at: int) -> str:
        # "-fADDR" or "-f ADDR", also at the end of a cluster ("-tif ADDR"): the value of
        # the option letter at ``at`` is the rest of ``arg``, else the next argument.
        nonlocal i
        letter = arg[at]
        attached = arg[at + 1 :]
        if attached:
            return attached
        i += 1
        if i >= len(argv):
            raise UsageError(f"option -{letter} requires an argument")
        return argv[i]

    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if arg.startswith("--"):
            if arg != "--help":
                # Also --store and --config: see the module docstring.
                raise UsageError(f"unknown option {arg.partition('=')[0]}")
            args.help = True
        elif not arg.startswith("-") or arg == "-":
            break
        else:
            _cluster(args, arg, value)
        i += 1
    args.recipients.extend(argv[i:])
    return args


def _cluster(args: SendmailArgs, arg: str, value: Callable[[str, int], str]) -> None:
    """One option argument: flags clustered as getopt reads them (``-ti``, ``-tif ADDR``,
    ``-oi``), the last one of which may take a value."""
    for at in range(1, len(arg)):
        letter = arg[at]
        if letter in _FLAGS:
            args.extract = args.extract or letter == "t"
            args.ignore_dots = args.ignore_dots or letter == "i"
            continue
        if letter == "q":
            raise UsageError(f"-{arg[at:]} is not supported: {_UNSUPPORTED_MODES['q']}")
        if letter not in _WITH_VALUE:
            raise UsageError(f"unknown option {arg}")
        text = value(arg, at)
        mode = f"b{text[:1]}"
        if letter == "b" and mode not in _MODES:
            # Every mode but delivery and the queue listing: -bt (address test mode),
            # -bv, -bh... must never queue the message they were given as a test.
            why = _UNSUPPORTED_MODES.get(mode, "only -bm (the default), -bp and -bs are")
            raise UsageError(f"-{mode} is not supported: {why}")
        if letter == "b":
            # The last mode given wins, as with Postfix's sendmail: -bs -bm queues.
            args.list_queue, args.smtp = mode == "bp", mode == "bs"
        elif letter in ("f", "r"):
            args.sender = text
        elif letter == "F":
            args.full_name = text
        elif letter == "N":
            args.notify = text
        elif letter == "R":
            args.ret = text
        elif letter == "V":
            args.envid = text
        elif letter == "o" and text[:1] == "i":
            # -oi (and -oitrue) keep dots; every other -o option is about sendmail.cf.
            args.ignore_dots = text[1:].lower() not in ("false", "f", "0")
        # Anything else: -d debug, -Am/-Ac, -e error mode, -o
        # options of sendmail.cf and the values of _IGNORED_WITH_VALUE.
        return


def read_message(stream: LineReadable, *, ignore_dots: bool, limit: int) -> bytes:
    """The message on ``stream``: to end of input, or (without -i) to a lone ``.`` line.

    Reading stops one octet past ``limit`` (the message size limit) with MessageTooLarge:
    a message that large would be refused anyway, and an endless pipe must not be held in
    memory first.
    """
    source = "the message on standard input"
    if ignore_dots:
        data = read_limited(stream, limit, source=source)
    else:
        data = read_until_dot(stream, limit, source=source)
    # An mbox "From " separator line is dropped, as sendmail does; not "From : x", the
    # From field written the obsolete way (RFC 5322 §4.5.3), which prepare() reads.
    if data.startswith(b"From ") and not _FIELD.match(data):
        data = data.partition(b"\n")[2]
    return data


_RESENT_RECIPIENTS = ("resent-to", "resent-cc", "resent-bcc")


# A header field's first line as Postfix's is_header() knows it (a name of printable
# ASCII but the colon, white space, a colon: RFC 5322 §3.6.8 and §4.5.3), and a line end
# followed by a line that is neither that nor a continuation (an empty line included).
# Possessive: a long line without a colon is not tried again one octet shorter each time.
_FIELD = re.compile(rb"[!-9;-~]++[ \t]*+:")
_NOT_A_FIELD = re.compile(rb"\n(?![ \t]|[!-9;-~]++[ \t]*+:)")


def end_header_section(data: bytes) -> bytes:
    """``data`` with the empty line that ends its header section inserted where the
    section ends without one: before the first line that is neither a header field nor a
    continuation of one (at the start when the first line is none).

    Sendmail and Postfix (cleanup) start the body at such a line, so ``echo text |
    sendmail root`` and ``Subject: x`` followed straight by the text are mail there;
    prepare() refuses both as a line break inside a header. A first line that merely
    looks like a field is one (``Note: disk full``), as it is to Postfix.
    """
    if not _FIELD.match(data):
        end = 0
    else:
        # Looked for within the longest section the bounds allow (to the end of the line
        # there, so that each line looked at is seen whole): past it the section is
        # refused as too long whatever ends it, and 35 MB of fields cost nothing.
        window = data.find(b"\n", MAX_HEADER_SECTION)
        found = _NOT_A_FIELD.search(data, 0, len(data) if window < 0 else window + 1)
        if found is None or found.start() >= MAX_HEADER_SECTION:
            return data
        end = found.start() + 1
    # An empty line ends it already; a line starting with a bare CR is left as it was,
    # for prepare() to refuse (a line break inside a header, to it).
    if end == len(data) or data.startswith((b"\n", b"\r"), end):
        return data
    return data[:end] + _newline(data) + data[end:]


def _newline(data: bytes) -> bytes:
    """The line ending of the first line of ``data``, for a line put into it."""
    return b"\r\n" if b"\r\n" in data.partition(b"\n")[0] + b"\n" else b"\n"


def header_recipients(section: HeaderSection) -> list[str]:
    """Addresses in the To, Cc and Bcc headers (for -t); in the Resent-To, Resent-Cc and
    Resent-Bcc headers of the newest resent block instead when the message has any, as
    Postfix does and ``prepare`` does for a message without envelope recipients: a resent
    message goes to its new recipients, not again to its first ones, nor to an earlier
    resend's (RFC 5322 §3.6.6).

    ``section`` is read by prepare()'s own parser, so that -t sees the fields prepare()
    sees: the stdlib's ended the header section at an obsolete ``Bcc : x`` (white space
    before the colon, RFC 5322 §4.5.3), which prepare() then dropped from the message
    without its address ever becoming a recipient."""
    resent = any(field.name in _RESENT_RECIPIENTS for field in section.fields)
    if not resent:
        values = [value for name in ("to", "cc", "bcc") for value in section.values(name)]
        return [addr for _, addr in address_pairs(values) if addr]
    # The newest resent block's alone: an older one's named an earlier resend's.
    newest = dataclasses.replace(section, fields=section.fields[: newest_block_end(section)])
    values = [value for name in _RESENT_RECIPIENTS for value in newest.values(name)]
    return [addr for _, addr in address_pairs(values) if addr]


def build(
    data: bytes,
    args: SendmailArgs,
    *,
    default_domain: str,
    aliases: Mapping[str, Sequence[str]] | None = None,
    max_recipients: int = DEFAULT_MAX_RECIPIENTS,
) -> tuple[bytes, list[str]]:
    """The message bytes (with a From header added if missing, bare local names in its
    address fields given ``default_domain``, the origin) and the envelope recipients
    (bare names through ``aliases``, then given the origin; see
    :mod:`mailstrom.cli.localnames`). Empty ``data`` is a message of the From header
    alone, as Postfix's cleanup makes it (``-bs``: DATA ended at once); standard input
    holding nothing is refused before, by :func:`_enqueue`. Address fields naming more
    mailboxes than prepare() takes with ``max_recipients`` are refused as they are read
    (:class:`~mailstrom.cli.localnames.MailboxCount`)."""
    data = utf8_header_section(end_header_section(data), default_domain, max_recipients)
    # prepare()'s parser (which bounds the section first): what it reads, -t reads.
    section = split_header_section(data)
    resending = any(field.name in _RESENT_RECIPIENTS for field in section.fields)
    # As Postfix's cleanup does: the invoking user (or -f) is the author of a message
    # without From, and its resender when it is resent without Resent-From (RFC 5322
    # §3.6.6 requires one; prepare() refuses a resent message without it).
    for name, missing in (("From", True), ("Resent-From", resending)):
        if missing and not section.values(name):
            named = args.sender if envelope_sender(args.sender, default_domain) else None
            text = named or _user_name(name)
            box = _bare_mailbox(text, default_domain)
            # The name of ``root (Cron Daemon)`` is its comment, as qualify_headers()
            # reads ``From: root (Cron Daemon)``.
            comment = next(iter(address_pairs([text])), ("", ""))[0]
            address = (
                format_address(box.name or comment, box.address.written)
                if box
                else qualify(text, default_domain)
            )
            line = f"{name}: " + from_field(args.full_name or "", address)
            data = line.encode("utf-8", "surrogateescape") + _newline(data) + data
    # Qualified (and counted) first: -t then reads fields within the bound.
    qualified = qualify_headers(data, default_domain, max_recipients=max_recipients)
    data = encode_long_lines(fold_long_fields(merge_repeated_fields(qualified)))
    recipients = [a for text in args.recipients for a in _argument_addresses(text, default_domain)]
    if args.extract:
        recipients = header_recipients(section) + recipients
    given, recipients = recipients, expand_all(recipients, aliases or {}, default_domain)
    if given and not recipients:
        # Every recipient given leads to what mailstrom does not deliver to: not a usage
        # error, a recipient that cannot be used (as an alias to a bad address is, 65).
        names = ", ".join(dict.fromkeys(given))
        raise CLIError(
            f"no recipients: {shorten(names, 200)} lead (through the aliases file) only "
            "to programs, files or includes, which mailstrom does not deliver to",
            EX_DATAERR,
        )
    if not recipients:
        hint = (
            "no recipients in the To, Cc or Bcc headers"
            if args.extract
            else ("no recipients: name them as arguments, or use -t")
        )
        raise UsageError(hint)
    return data, recipients


def _user_name(field: str) -> str:
    """The invoking user's login name, the author of a message without ``field`` (From or
    Resent-From) and without -f; CLIError (65) when there is none: a uid of no passwd
    entry (a container run as an arbitrary uid) without LOGNAME or USER made getpass
    raise KeyError (OSError on newer Pythons), reported as an internal error (70)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        raise CLIError(
            f"the message has no {field} header and there is no -f, and user id "
            f"{os.getuid()} has no name (no passwd entry, LOGNAME and USER unset) to sign "
            f"it with: give -f ADDRESS or a {field} header",
            EX_DATAERR,
        ) from None


def utf8_header_section(
    data: bytes, origin: str, max_recipients: int = DEFAULT_MAX_RECIPIENTS
) -> bytes:
    """``data`` with a header section that is not UTF-8 transcoded to UTF-8 from the
    charset its Content-Type declares, when the octets are text in that charset.

    A PHP site kept in ISO-8859-1 writes ``Subject: Bestätigung`` in ISO-8859-1 and
    says so in ``Content-Type: text/plain; charset=ISO-8859-1``; Postfix and Sendmail
    send such a header on, and prepare() refused it (exit 65, raw 8-bit headers must be
    UTF-8, RFC 6532). In UTF-8 it reads the same and is what prepare() takes. Without a
    declared charset, or octets that are no text in it, nothing is guessed: the message
    is left for prepare() to refuse with its reason. Bare names in its address fields
    get ``origin``, as :func:`~mailstrom.cli.localnames.qualify_headers` gives them, and
    their mailboxes are counted as it counts them (``max_recipients``)."""
    crlf = to_crlf(data)
    body = mime.body_start(crlf, 0, len(crlf))
    head = crlf[:body]
    if head.isascii():
        return data
    try:
        head.decode("utf-8")
        return data
    except UnicodeDecodeError:
        pass
    charset = BytesHeaderParser().parsebytes(head).get_content_charset()
    try:
        codec = codecs.lookup(charset or "")
        text = head.decode(codec.name)
    except (LookupError, UnicodeDecodeError):
        return data
    if _ASCII.decode(codec.name, "replace") != _ASCII.decode("ascii"):
        return data  # not a superset of ASCII (UTF-16...): field names would change
    out = _words_for_text(text, origin, MailboxCount(max_recipients))
    return out.encode("utf-8", "surrogateescape") + crlf[body:]


_ASCII = bytes(range(128))
_TEXT_FIELDS = frozenset({"subject", "comments", "keywords"})
"""Fields of plain text (RFC 5322 §3.6.5), written as RFC 2047 encoded words when they
are not ASCII: raw UTF-8 in them needs a server offering SMTPUTF8, which the ISO-8859-1
mail of old scripts never did. Keywords, a list of phrases, is encoded phrase by phrase
(:data:`~mailstrom.message.words.PHRASE_LIST_FIELDS`)."""


def _words_for_text(head: str, origin: str, counted: MailboxCount) -> str:
    """``head`` (a header section, CRLF lines) with each field of :data:`_TEXT_FIELDS`
    that is not ASCII written as encoded words, and the display names of each address
    field that is not ASCII too (the names of ``From: Jörg <shop@example.org>`` as raw
    UTF-8 made the message need SMTPUTF8, refused for good by servers without it); the
    other fields as they were."""
    fields: list[list[str]] = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    out = []
    for lines in fields:
        raw = "\r\n".join(lines)
        name, colon, value = raw.partition(":")
        if colon and name.strip().lower() in _TEXT_FIELDS and not raw.isascii():
            # Unfolded (the line breaks removed only, RFC 5322 §2.2.3) and written again.
            text = value.replace("\r\n", "").strip(" \t")
            raw = unstructured_field(name.strip(), text, utf8=False)
        elif colon and name.strip().lower() in REWRITTEN_HEADERS and not raw.isascii():
            try:
                raw = address_field(name.strip(), value, origin, counted)
            except TooManyRecipients:
                raise
            except InvalidMessage:
                pass  # prepare() refuses it, saying why
        out.append(raw)
    return "\r\n".join(out)


_MERGED_FIELDS = frozenset({"to", "cc", "reply-to"})
"""Address-list fields RFC 5322 §3.6 allows once whose repeats add to each other."""


def merge_repeated_fields(data: bytes) -> bytes:
    """``data`` with the To, Cc and Reply-To fields each written once: a repeated one's
    addresses joined to the first's (an empty one, or one the same as before, dropped).

    PHP's mail() writes ``To:`` from its first argument and then the caller's headers,
    which often hold a To of their own (as the PHP manual's HTML example does), or an
    empty first argument gives ``To:`` alone: Postfix and Sendmail send both fields on,
    and prepare() refused the message (exit 65, two To fields; mail() returned false).
    One field naming every address is what RFC 5322 §3.6 allows; -t has read both."""
    try:
        section = split_header_section(to_crlf(data))
    except InvalidMessage:
        return data  # prepare() refuses it with the reason
    names = [f.name for f in section.fields if f.name in _MERGED_FIELDS]
    if len(names) == len(set(names)):
        return data
    fields: list[Field] = []
    first: dict[str, int] = {}
    seen: dict[str, set[bytes]] = {}
    for f in section.fields:
        if f.name not in _MERGED_FIELDS:
            fields.append(f)
            continue
        rest = f.lines[0].partition(b":")[2]
        key = b" ".join(b"".join((rest, *f.lines[1:])).split())
        known = seen.setdefault(f.name, set())
        if f.name not in first:
            first[f.name] = len(fields)
            fields.append(f)
            known.update([key] if key else [])
            continue
        if not key or key in known:
            continue  # an empty field, or the same addresses again: nothing to add
        kept = fields[first[f.name]]
        value = rest.lstrip(b" \t")
        added = ([b" " + value] if value else []) + list(f.lines[1:])
        if known:
            # The added addresses start a line of their own: no line grows by them.
            lines = [*kept.lines[:-1], kept.lines[-1] + b",", *added]
        else:
            # The first was empty: it takes this one's addresses.
            name = kept.lines[0].partition(b":")[0]
            lines = [name + b":" + (added[0] if value else b""), *added[1 if value else 0 :]]
        fields[first[f.name]] = dataclasses.replace(kept, lines=tuple(lines))
        known.add(key)
    return dataclasses.replace(section, fields=tuple(fields)).rewrite(drop=(), add=())


def fold_long_fields(data: bytes) -> bytes:
    """``data`` with each header line over 998 octets (RFC 5322 §2.1.1) folded at white
    space within it, as Postfix's SMTP client folds one: PHP's mail() writes ``To: a,
    b, ...`` on one line however many recipients it names, and prepare() refused the
    message (exit 65). Unfolding gives the field back as it was written. A line without
    white space to fold at is left, for prepare() to refuse with its advice."""
    if len(data) <= MAX_LINE:
        return data
    try:
        section = split_header_section(to_crlf(data))
    except InvalidMessage:
        return data  # prepare() refuses it with the reason
    if all(len(line) <= MAX_LINE for f in section.fields for line in f.lines):
        return data
    fields = [
        dataclasses.replace(f, lines=tuple(piece for line in f.lines for piece in fold_line(line)))
        for f in section.fields
    ]
    return dataclasses.replace(section, fields=tuple(fields)).rewrite(drop=(), add=())


def envelope_sender(sender: str | None, origin: str) -> str | None:
    """The envelope sender ``-f`` asks for: None without ``-f`` (prepare() takes the
    Sender/From), ``""`` for ``-f ''`` or ``-f '<>'``, the null reverse-path, as Sendmail
    and Postfix read them (vacation programs and bounce generators send with it, so
    that nothing answers them: an address there would get the auto-replies back), else
    the address of the one mailbox it names, a display name or comment dropped as
    Postfix's sendmail drops them (``Fail2Ban <root@localhost>``), a local name given the
    origin; text naming no single mailbox is passed on, for prepare() to refuse."""
    if sender is None:
        return None
    if sender.strip() in ("", "<>"):
        return ""
    box = _one_mailbox(sender, origin)
    return box.address.written if box else qualify(sender, origin)


def _bare_mailbox(text: str, origin: str) -> Mailbox | None:
    """The one mailbox ``text`` names when its address is a bare name, given the origin:
    ``root``, and also ``<root>``, ``Cron <root>`` or ``root (Cron)``, which qualify()
    took for a name of its own (``<root>@origin``, refused as malformed, exit 65). None
    for an address with a domain, or text that is no single mailbox (qualify() then
    decides, and prepare() reads it or refuses it with a precise reason)."""
    return None if "@" in text else _one_mailbox(text, origin)


def _one_mailbox(text: str, origin: str) -> Mailbox | None:
    """The one mailbox ``text`` names, a bare name or one at localhost given the origin
    (:func:`~mailstrom.message.addresses.parse_local_address_list`); None for text that
    is no single mailbox: two, a group, a line break, no address at all."""
    try:
        groups = parse_local_address_list("-f", text, origin)
    except InvalidMessage:
        return None
    if len(groups) != 1 or groups[0].name is not None or len(groups[0].mailboxes) != 1:
        return None
    return groups[0].mailboxes[0]


def from_field(full_name: str, address: str) -> str:
    """The From field's value for ``-F full_name`` and the sender ``address``, both
    checked like any header text: a CR or LF in them would start a header field of the
    caller's choosing (``-F $'x\nBcc: ...'``)."""
    check_header_text("-F", full_name)
    check_header_text("-f", address)
    if full_name:
        # -F names the address: ``-f '<addr>'`` or ``-f 'Name <addr>'`` (what the
        # envelope sender is read from) gives only its addr-spec, or the field would
        # hold "Name <<addr>>".
        address = _addr_spec(address)
    return format_address(full_name, address)


def _addr_spec(sender: str) -> str:
    """The address of ``sender`` written with angle brackets, a display name or a comment
    (``<ann@example.org>``), as prepare() reads the envelope sender; ``sender`` itself
    when it is no single mailbox, for prepare() to refuse with a precise reason."""
    try:
        return parse_mailbox("-f", sender).address.written
    except InvalidMessage:
        return sender


def _argument_addresses(text: str, origin: str) -> list[str]:
    """A recipient argument may hold several addresses, with display names, as sendmail
    allows ("bob@example.org, Carol <carol@example.org>", empty elements too: "bob@example.org,
    "); text that is no address list is kept as-is for prepare() to reject with a precise
    reason. The list is checked with mailstrom's parser (a bare name there taking the
    origin), since getaddresses() guesses: it reads ``Bob Smith`` as ``Bob``, another
    mailbox."""
    pairs = [pair for pair in address_pairs([text]) if pair != ("", "")]
    try:
        groups = parse_local_address_list("recipient", text, origin)
    except InvalidMessage:
        return [text]
    if not pairs or len(pairs) != sum(len(g.mailboxes) for g in groups):
        return [text]
    return [addr for _, addr in pairs]


def main(argv: Sequence[str], *, mailstrom_options: Sequence[str] = ()) -> int:
    """Run as sendmail; never raises (errors become sysexits codes).

    ``mailstrom_options`` are global options given before ``sendmail``
    (``mailstrom --store X sendmail``): refused, as the same options after it are.
    """
    try:
        if mailstrom_options:
            raise UsageError(
                f"sendmail takes no mailstrom options ({mailstrom_options[0].partition('=')[0]}"
                f"); set them in {SYSTEM_CONFIG_PATH} or a file named by {CONFIG_PATH_ENV}"
            )
        args = parse_args(argv)
        if args.help or args.list_queue:
            end_with_reader()  # a listing's: its reader may go away (`| head`)
        if args.help:
            sys.stdout.write(HELP)
            return EX_OK
        _refuse_mode_conflicts(args)
        if args.smtp:
            return _serve_smtp(args)
        if args.list_queue:
            return _list_queue()
        return _enqueue(args)
    except UsageError as exc:
        say(f"mailstrom: {reason_for(exc)}")
        return EX_USAGE
    except ReaderGone:  # -bp or --help read by `head`, which went away
        return reader_gone()
    except BrokenPipeError as exc:
        # Anywhere else it is a failure: exit 0 said "queued" of a message that was not.
        return fail(exc)
    except KeyboardInterrupt:  # Ctrl-C while the message is typed: nothing is queued
        return EX_INTERRUPTED
    except Exception as exc:
        return fail(exc)


def _refuse_mode_conflicts(args: SendmailArgs) -> None:
    """UsageError for what the mode given would ignore, as Postfix's sendmail refuses
    it: ``-t`` outside delivery mode (``-bm``), recipients with ``-bp`` or ``-bs``. The
    caller meant them, and believed them used."""
    mode = "-bs" if args.smtp else "-bp" if args.list_queue else None
    if mode is None:
        return
    if args.extract:
        raise UsageError(f"-t can be used only in delivery mode (-bm), not with {mode}")
    if args.recipients:
        where = "RCPT, not as arguments" if args.smtp else "nowhere: it lists the queue"
        raise UsageError(f"{mode} takes no recipient arguments ({where})")


def _enqueue(args: SendmailArgs) -> int:
    # Fixed places only (MAILSTROM_CONFIG aside): never the user's or the working
    # directory's files, which whoever can write there would control.
    # A bad -N/-R/-V is a usage error before reading the message. Without them the
    # message still carries a DSN request (NOTIFY left to the server), as an MTA's mail
    # does: the worker then bounces final failures to the sender (docs/guide.md).
    dsn = args.dsn() or DSN()
    _refuse_misplaced_options(args.recipients)
    settings = sendmail_settings()
    require_lasting_store(settings)  # before the message is read: the caller keeps it
    message = read_message(
        stdin_buffer(), ignore_dots=args.ignore_dots, limit=settings.config.max_message_size
    )
    if not message.strip():
        raise CLIError("no message on standard input", EX_NOINPUT)
    queue_message(settings, message, args, dsn)
    return EX_OK


def _refuse_misplaced_options(recipients: Sequence[str]) -> None:
    """UsageError for a recipient argument that is a bare name starting with ``-``.

    Options end at the first recipient, so ``sendmail bob@example.org -oi`` named
    ``-oi`` as a recipient, which the origin made ``-oi@origin``, and ``... -f
    app@example.org`` mailed the would-be sender. No user name starts with ``-``
    (Postfix bounces such addresses, allow_min_user; Sendmail on glibc reads them as
    options): it is an option given too late. An address with a domain is taken."""
    for text in recipients:
        if text.startswith("-") and is_bare(text.strip()):
            raise UsageError(
                f"recipient {shorten(text, 40)} looks like an option: options go before "
                "the recipients"
            )


def queue_message(
    settings: Settings,
    message: bytes,
    args: SendmailArgs,
    dsn: DSN,
    *,
    arrival: SMTPArrival | None = None,
) -> str:
    """Build, prepare and queue ``message`` with the envelope of ``args`` (-f, the
    recipients, -t); its id. Raises as sendmail fails (see :func:`main`).

    A Received field goes on top (RFC 5321 §4.4): of the SMTP client of ``arrival``
    (``-bs``), else of the invoking user. It is put there before prepare(), so that the
    bounds on the header section count it: a message at the most fields is refused,
    never queued past it."""
    from mailstrom.client.common import prepare_for

    origin = _origin(settings)
    path = aliases_path(settings.values.get("sendmail.aliases"))
    with _origin_at_fault(settings, origin):
        data, recipients = build(
            message,
            args,
            default_domain=origin,
            aliases=read_aliases(path) if path else None,
            max_recipients=settings.config.max_recipients,
        )
        now = utc_now()
        data = (
            received_field(
                by=settings.config.helo_name,
                now=now,
                newline=_newline(data),
                arrival=arrival,
                uid=os.getuid(),
                # Named for -bs alone (one RCPT, its only reader): plain sendmail's one
                # argument may be a blind recipient of a -t message.
                recipients=[qualify(r, origin) for r in args.recipients] if arrival else (),
            )
            + data
        )
        sender = envelope_sender(args.sender, origin)
        prepared = prepare_for(
            settings.config,
            data,
            envelope_from=sender,
            envelope_to=recipients,
            now=now,
            dsn=dsn,
        )
    with store_from(settings) as store:
        return store.enqueue(prepared, now=now)


def _origin(settings: Settings) -> str:
    """The domain bare names are given (setting sendmail.origin)."""
    return settings.values.get("sendmail.origin") or default_origin(settings.config.helo_name)


@contextlib.contextmanager
def _origin_at_fault(settings: Settings, origin: str) -> Iterator[None]:
    """ConfigError, saying what to set, for an address refused because it was given an
    origin no address may have; other errors as they are.

    Without sendmail.origin (which is checked when read) the origin of a host whose name
    is private or special-use (``host.local``) is ``helo_name``, itself that name unless
    configured: every message with a bare name was refused as malformed (exit 65, "invalid
    address 'root@host.local'"), which blamed the message and named no setting. Only
    refused addresses are looked at, so a host without a usable origin still sends mail
    naming no bare name. An address written at that name itself is a local name there
    (Postfix's mydestination holds $myhostname), so its refusal is the same fault."""
    try:
        yield
    except InvalidAddress as exc:
        local, _, domain = exc.address.rpartition("@")
        if domain.lower() != origin.lower() or mail_domain_problem(origin) is None:
            raise
        name = local if local.isprintable() and len(local) <= 64 else shorten(local, 64)
        # Unconfigured, helo_name falls back to localhost for a host name no domain may
        # be (``my_laptop``): the name to mend is the host's, not the fallback's.
        if settings.values.get("helo_name"):
            source = f"helo_name {origin}"
        else:
            host = host_name()
            shown = host if host.isprintable() and len(host) <= 100 else shorten(host, 100)
            source = f"this host's name {shown}"
        raise ConfigError(
            f"{name}: no domain to qualify a local name with ({source} is not "
            "a public mail domain); set sendmail.origin (MAILSTROM_SENDMAIL_ORIGIN) "
            "or helo_name"
        ) from None


def _serve_smtp(args: SendmailArgs) -> int:
    """-bs: an SMTP session on standard input and output, each message queued as
    :func:`_enqueue` queues one but with the envelope of MAIL and RCPT: -f and -i
    mean nothing there (Laravel runs ``sendmail -bs -i``); -t and recipient arguments
    were refused (:func:`_refuse_mode_conflicts`)."""
    from mailstrom.cli.sendmail_smtp import Unusable, serve

    dsn = args.dsn() or DSN()
    settings = sendmail_settings()
    require_lasting_store(settings)

    def queue(message: bytes, sender: str, recipients: list[str], arrival: SMTPArrival) -> str:
        envelope = SendmailArgs(
            sender=sender, recipients=recipients, full_name=args.full_name, ignore_dots=True
        )
        return queue_message(settings, message, envelope, dsn, arrival=arrival)

    # Each address is checked at its MAIL or RCPT as queue_message() reads it (build()
    # and prepare_for()), so that one bad RCPT is refused on its own, not the message.
    origin = _origin(settings)
    aliases: list[Mapping[str, Sequence[str]]] = []

    def check_sender(sender: str) -> None:
        with _origin_at_fault(settings, origin):
            address = envelope_sender(sender, origin)
            if address:
                parse_mailbox("envelope_from", address)

    def check_recipient(recipient: str) -> None:
        with _origin_at_fault(settings, origin):
            check_one(recipient)

    def check_one(recipient: str) -> None:
        # The client's own address badly written is its syntax error (501); an alias
        # of it going nowhere usable is a mailbox refused (550, 553), as sendmail's
        # plain path reads it as a bad address (65), not a bad command line.
        if not aliases:
            path = aliases_path(settings.values.get("sendmail.aliases"))
            aliases.append(read_aliases(path) if path else {})
        addresses = _argument_addresses(recipient, origin)
        if len(addresses) > 1:
            # A list is for the command line: RCPT takes one forward-path (RFC 5321
            # §4.1.1.3), and MAX_RECIPIENTS counts RCPT commands.
            raise InvalidMessage(
                f"{shorten(recipient, 100)} is {len(addresses)} addresses; RCPT names one"
            )
        for address in addresses:
            targets = expand(address, aliases[0], origin)
            name = unlocal(address)
            if not (is_bare(name) and name.lower() in aliases[0]):
                if not targets:  # a program, file or include named in RCPT itself
                    raise InvalidMessage(f"{address!r} is no mail address")
                for target in targets:
                    parse_mailbox("envelope_to", target)
                continue
            if not targets:
                raise Unusable(
                    "550 5.1.1",
                    f"{address!r} is an alias to programs, files or includes only, "
                    "which mailstrom does not deliver to",
                )
            for target in targets:
                try:
                    with _origin_at_fault(settings, origin):  # its ConfigError passes
                        parse_mailbox("envelope_to", target)
                except InvalidMessage as exc:
                    raise Unusable(
                        "553 5.1.3", f"the alias {address!r} names a bad address: {reason_for(exc)}"
                    ) from None

    return serve(settings, queue, check_sender=check_sender, check_recipient=check_recipient)


def _list_queue() -> int:
    """-bp: the pending queue, as ``mailq`` (``mailstrom queue``) prints it."""
    from mailstrom.cli.selection import COUNT_CAP
    from mailstrom.cli.views import print_queue, suspended_domains
    from mailstrom.stores.base import QueueFilter
    from mailstrom.stores.operator import PENDING_STATES

    now = utc_now()
    where = QueueFilter(states=PENDING_STATES, limit=_MAILQ_LIMIT)
    with store_from(sendmail_settings(), read_only=True) as store:
        messages = store.query(now=now, where=where)
        total = len(messages)
        if total >= _MAILQ_LIMIT:
            total = store.count(now=now, where=where, cap=COUNT_CAP)
        suspended = suspended_domains(store, now)
    print_queue(messages, now, total=total, suspended=suspended)
    return EX_OK


_MAILQ_LIMIT = 1000
"""Messages ``sendmail -bp`` lists at most (a footer says how many more there are)."""


def sendmail_settings() -> Settings:
    """The configuration of the sendmail personality: ``$MAILSTROM_CONFIG`` or
    :data:`~mailstrom.settings.SYSTEM_CONFIG_PATH`, then ``MAILSTROM_*`` variables."""
    return report(load_settings(paths=[SYSTEM_CONFIG_PATH]))


def register(sub: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    """Listed in ``mailstrom --help``; ``main`` dispatches to :func:`main` before argparse."""
    parser = sub.add_parser(
        "sendmail",
        add_help=False,
        help="drop-in for /usr/sbin/sendmail: queue a message read on stdin",
    )
    parser.set_defaults(handler=_options_before)


def _options_before(args: argparse.Namespace) -> int:
    """argparse reaches ``sendmail`` only when mailstrom options came before it in a
    form :func:`~mailstrom.cli.main.main` did not split off: refused, as those are."""
    raise UsageError(f"sendmail takes no mailstrom options; set them in {SYSTEM_CONFIG_PATH}")

"""Bare local names in mail from local programs: ``root``, ``www-data``, ``From: root (Cron
Daemon)``. cron, at, mdadm and smartd address mail to a user name and sign it with one
(fail2ban, and many scripts, to ``root@localhost``: the same local name);
a mail server gives such a name its origin domain (Postfix's ``myorigin``, by default the
host's name) and looks it up in ``/etc/aliases`` first. The sendmail personality does the
same, so their mail reaches a real mailbox instead of being refused.

``sendmail.origin`` names the domain (default: the host's fully qualified name when it
is a public one, else ``helo_name``); ``sendmail.aliases`` the aliases file (default
``/etc/aliases`` when it exists; an empty value turns aliases off). Aliases map bare
names only, recursively (a bounded depth, loops stopped; a name after a backslash,
``\\root``, is not aliased again); targets that are programs, files or includes
(``|cmd``, ``/path``, ``:include:``) are skipped: mailstrom delivers no local mail.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from collections.abc import Iterable, Mapping, Sequence
from email.utils import formataddr, quote

from mailstrom.domains import is_public_name
from mailstrom.errors import ConfigError, InvalidMessage
from mailstrom.message.addresses import Group, is_localhost, parse_local_address_list
from mailstrom.message.envelope import (
    DEFAULT_MAX_RECIPIENTS,
    MailboxCount,
)
from mailstrom.message.stdlib_addresses import address_pairs
from mailstrom.settings import mail_domain_problem

DEFAULT_ALIASES = "/etc/aliases"
MAX_ALIASES_SIZE = 1 << 20
"""Octets of an aliases file read at most (Debian's is a few hundred)."""
MAX_ALIASES = 10_000
"""Entries of an aliases file at most."""
MAX_DEPTH = 10
"""How deep aliases expand (``root: admin``, ``admin: ops@example.com`` is depth 2)."""
MAX_EXPANSION = 1_000
"""Addresses one name may expand to at most."""
REWRITTEN_HEADERS = frozenset(
    {"from", "sender", "reply-to", "to", "cc", "bcc"}
    | {"resent-from", "resent-sender", "resent-to", "resent-cc", "resent-bcc"}
)
"""Header fields whose bare names get the origin domain."""


def host_name() -> str:
    """This host's fully qualified name, as the resolver gives it (without a final dot)."""
    return socket.getfqdn().rstrip(".")


def default_origin(helo_name: str) -> str:
    """The host's fully qualified name, or ``helo_name`` when it has none that mail can be
    sent to from elsewhere: no dot, a name private to the host or its network
    (:func:`~mailstrom.domains.is_public_name`: Red Hat's ``localhost.localdomain``, an
    installer's ``host.localdomain``, mDNS's ``host.local`` of RFC 6762, RFC 8375's
    ``home.arpa``, ``internal``, ``lan``), or one no address may have (``my_laptop.example``).
    Bare names are mostly cron's and daemons' reports to ``root``, and in From, which a
    receiver checks: the name the host gives itself in EHLO serves them both."""
    fqdn = host_name().lower()
    usable = is_public_name(fqdn) and mail_domain_problem(fqdn) is None
    return fqdn if usable else helo_name


def is_bare(address: str) -> bool:
    """Whether ``address`` is a local name without a domain (``root``, ``www-data``)."""
    return bool(address) and "@" not in address and not address.startswith(("|", "/", ":"))


def unlocal(address: str) -> str:
    """``address`` as a bare name when its domain is localhost (``root@localhost``, as
    fail2ban and many scripts address mail to root: Postfix delivers it locally, through
    the aliases); else ``address`` itself."""
    local, at, domain = address.rpartition("@")
    return local if at and local and is_localhost(domain) else address


def qualify(address: str, origin: str) -> str:
    """``address`` with ``@origin`` appended when it is a bare name, in place of the
    domain when that is localhost."""
    address = unlocal(address)
    return f"{address}@{origin}" if is_bare(address) else address


def read_aliases(path: str) -> dict[str, list[str]]:
    """The aliases in ``path`` (``name: target, target`` lines, ``#`` comments,
    continuation lines starting with white space); ConfigError when unreadable or too big.
    Names are matched case-insensitively, as sendmail does."""
    data = _read_regular_file(path, MAX_ALIASES_SIZE + 1)
    if len(data) > MAX_ALIASES_SIZE:
        raise ConfigError(f"sendmail.aliases: {path} is larger than {MAX_ALIASES_SIZE} octets")
    entries: list[str] = []
    for line in data.decode("utf-8", "replace").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t" and entries:
            entries[-1] += " " + line.strip()
        else:
            entries.append(line.strip())
    if len(entries) > MAX_ALIASES:
        raise ConfigError(f"sendmail.aliases: {path} has more than {MAX_ALIASES} entries")
    aliases: dict[str, list[str]] = {}
    for entry in entries:
        name, colon, rest = entry.partition(":")
        if not colon or not name.strip():
            continue  # not an alias line; sendmail's newaliases would complain, we skip it
        targets = [_unquoted(t.strip()) for t in _split_targets(rest) if t.strip()]
        aliases[name.strip().lower()] = targets
    return aliases


def _read_regular_file(path: str, limit: int) -> bytes:
    """At most ``limit`` octets of the regular file ``path``; ConfigError for anything
    else. Opened without blocking and looked at before it is read: opening a FIFO waits
    for a writer, which may never come (sendmail then hung for good), and a device or
    ``/dev/stdin`` holds no aliases (stdin, the message itself)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"sendmail.aliases: cannot read {path}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"sendmail.aliases: {path} is not a regular file")
        with open(fd, "rb", closefd=False) as f:
            return f.read(limit)
    except OSError as exc:
        raise ConfigError(f"sendmail.aliases: cannot read {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _split_targets(text: str) -> list[str]:
    """The comma-separated targets of an alias, a comma inside double quotes (a program's
    arguments, ``"|notify ops, dev"``, or a quoted local part) being part of its target,
    as newaliases reads them: split there, a program's second argument became a name."""
    targets: list[str] = []
    start = 0
    quoted = escaped = False
    for at, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            targets.append(text[start:at])
            start = at + 1
    targets.append(text[start:])
    return targets


def _unquoted(target: str) -> str:
    """``target`` without the double quotes around it (``"|cmd arg"``, ``"backup"``); a
    quoted local part (``"a b"@example.org``) keeps its quotes."""
    if len(target) >= 2 and target[0] == target[-1] == '"':
        return target[1:-1]
    return target


def expand(address: str, aliases: Mapping[str, Sequence[str]], origin: str) -> list[str]:
    """Where mail for ``address`` goes: a bare name through the aliases (recursively),
    each bare result given the origin domain; other addresses unchanged."""
    found: list[str] = []
    seen: set[str] = set()

    def walk(name: str, depth: int) -> None:
        name = unlocal(name)
        if name.startswith("\\") and is_bare(name[1:]):
            # \root: root itself, not aliased again (aliases(5) of Sendmail and Postfix;
            # "root: \root, ops@..." keeps a copy for root).
            found.append(qualify(name[1:], origin))
            return
        key = name.lower()
        targets = aliases.get(key) if is_bare(name) else None
        if targets is None or depth >= MAX_DEPTH or key in seen:
            if not name.startswith(("|", "/", ":")):  # programs, files, includes: skipped
                found.append(qualify(name, origin))
            return
        seen.add(key)
        for target in targets:
            if len(found) >= MAX_EXPANSION:
                return
            walk(target, depth + 1)

    walk(address, 0)
    return list(dict.fromkeys(found))


def expand_all(
    addresses: Iterable[str], aliases: Mapping[str, Sequence[str]], origin: str
) -> list[str]:
    """Where mail for ``addresses`` goes (:func:`expand` of each, in order, duplicates
    dropped). An alias is expanded once however often, and in whatever case, it is named:
    a message's ``To: staff, staff, ...`` (as many as its header section holds) walked
    the alias's targets once per mention."""
    found: dict[str, None] = {}
    expanded: set[str] = set()
    for address in addresses:
        # Aliases match case-insensitively, so Staff and STAFF go where staff goes.
        name = unlocal(address)
        key = name.lower() if is_bare(name) and name.lower() in aliases else address
        if key not in expanded:
            expanded.add(key)
            found.update(dict.fromkeys(expand(address, aliases, origin)))
    return list(found)


def qualify_headers(
    data: bytes, origin: str, *, max_recipients: int = DEFAULT_MAX_RECIPIENTS
) -> bytes:
    """``data`` with every bare name in its From, Sender, Reply-To, To, Cc and Bcc fields
    (and their Resent- forms) given the origin domain; other fields, and the body, byte
    for byte as they were. Their mailboxes are counted as they are read
    (:class:`MailboxCount`)."""
    end = _header_end(data)
    head, body = data[:end], data[end:]
    newline = b"\r\n" if b"\r\n" in head else b"\n"
    fields: list[list[bytes]] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    counted = MailboxCount(max_recipients)
    changed = False
    out: list[bytes] = []
    for lines in fields:
        raw = b"".join(lines)
        name, colon, value = raw.partition(b":")
        if colon and name.strip().lower().decode("ascii", "replace") in REWRITTEN_HEADERS:
            field = name.strip().decode("ascii", "replace")
            text = value.decode("utf-8", "surrogateescape")
            unfolded = " ".join(text.split())
            # Read (and counted) by mailstrom's parser before getaddresses() reads it: a
            # field past the bound costs no more. One it refuses is left for prepare()
            # unless it has a bare name to give the origin.
            groups: tuple[Group, ...] | InvalidMessage
            try:
                groups = parse_local_address_list(field, unfolded, origin)
            except InvalidMessage as exc:
                groups = exc
            else:
                counted.add(groups)
            pairs = address_pairs([unfolded])
            if any(is_bare(unlocal(addr)) for _, addr in pairs):
                # getaddresses() keeps only the first word of "Bob Smith": refused here
                # (InvalidAddress, exit 65) rather than rewritten to another mailbox.
                if isinstance(groups, InvalidMessage):
                    raise groups
                rendered = [
                    item.encode("utf-8", "surrogateescape")
                    for item in _list_items(groups, [p for p in pairs if p[1]], origin)
                ]
                out.append(_folded(name + b": ", rendered, newline) + newline)
                changed = True
                continue
        out.append(raw)
    return b"".join(out) + body if changed else data


def address_field(name: str, value: str, origin: str, counted: MailboxCount | None = None) -> str:
    """The address field ``name: value`` written again, folded with CRLF: each mailbox as
    :func:`format_address` writes it (a display name that is not ASCII as encoded words),
    bare names given the origin, groups kept; InvalidMessage when ``value`` is no address
    list (the caller leaves the field for prepare() to refuse with its reason), and
    TooManyRecipients from ``counted`` (see :class:`MailboxCount`)."""
    unfolded = " ".join(value.split())
    groups = parse_local_address_list(name, unfolded, origin)
    if counted is not None:
        counted.add(groups)
    pairs = address_pairs([unfolded])
    items = [
        item.encode("utf-8", "surrogateescape")
        for item in _list_items(groups, [p for p in pairs if p[1]], origin)
    ]
    start = name.encode("utf-8", "surrogateescape") + b": "
    return _folded(start, items, b"\r\n").decode("utf-8", "surrogateescape")


def _list_items(
    groups: Sequence[Group], pairs: Sequence[tuple[str, str]], origin: str
) -> list[str]:
    """The items of a rewritten address list: each mailbox of ``pairs`` (getaddresses'
    reading, which keeps ``root (Cron Daemon)``'s comment as the name) with bare names
    given the origin, inside the groups of ``groups`` (mailstrom's parser: getaddresses
    drops group names) as ``Name: first``, ``last;`` items (an empty one ``Name:;``), so
    that a group keeps its name and folds between its members."""
    items = [format_address(n, qualify(a, origin)) for n, a in pairs]
    if len(items) != sum(len(group.mailboxes) for group in groups):
        return items  # the two parsers disagree: no group to put them in
    out: list[str] = []
    at = 0
    for group in groups:
        members = items[at : at + len(group.mailboxes)]
        at += len(group.mailboxes)
        if group.name is None:
            out += members
            continue
        start = f"{_phrase(group.name)}:"
        if not members:
            out.append(start + ";")
            continue
        members[0] = f"{start} {members[0]}"
        members[-1] += ";"
        out += members
    return out


def _phrase(name: str) -> str:
    """A group's display name as a header writes it (quoted or encoded as needed)."""
    placeholder = "<x@x>"
    return format_address(name, placeholder[1:-1]).removesuffix(" " + placeholder)


FOLD_AT = 78
"""Octets a rewritten field's line holds at most, unless one address is longer
(RFC 5322 §2.1.1's "SHOULD" limit)."""


def _folded(start: bytes, addresses: list[bytes], newline: bytes) -> bytes:
    """``start`` and the comma-separated ``addresses``, folded before an address that
    would take the line past :data:`FOLD_AT`: written on one line, a field whose many
    addresses had been folded could pass the 998 octets that prepare() refuses."""
    out = bytearray(start)
    line = len(start)
    for i, address in enumerate(addresses):
        if i:
            if line + 2 + len(address) > FOLD_AT:
                out += b"," + newline + b" "
                line = 1
            else:
                out += b", "
                line += 2
        out += address
        line += len(address)
    return bytes(out)


def format_address(name: str, address: str) -> str:
    """``Name <address>`` as ``formataddr`` writes it (a non-ASCII name as an encoded
    word), also when ``formataddr`` refuses them with UnicodeEncodeError: an address that
    is not ASCII (RFC 6532), or octets that are not UTF-8 (kept as surrogate escapes) in
    either. The name is then written quoted, as it is: the message is not ASCII anyway,
    and prepare() refuses octets that are not UTF-8 with a reason."""
    try:
        return formataddr((name, address), charset="utf-8")
    except UnicodeEncodeError:
        return f'"{quote(name)}" <{address}>' if name else address


def _header_end(data: bytes) -> int:
    """Where the header section ends (the start of its empty line), or the data's end."""
    if data.startswith((b"\r\n", b"\n")):
        return 0
    # The first empty line, whatever the line ends around it: LF CRLF (fields ending
    # in LF, the empty line in CRLF) was neither CRLF CRLF nor LF LF, and the body up
    # to its own first empty line was rewritten as header fields.
    found = _EMPTY_LINE.search(data)
    return len(data) if found is None else found.start() + 1


_EMPTY_LINE = re.compile(rb"\n\r?\n")


def aliases_path(configured: str | None) -> str | None:
    """The aliases file to read: the setting (empty: none), else /etc/aliases if present."""
    if configured is not None:
        return configured or None
    return DEFAULT_ALIASES if os.path.isfile(DEFAULT_ALIASES) else None

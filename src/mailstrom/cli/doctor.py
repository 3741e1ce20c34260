"""``mailstrom doctor DOMAIN``: will receivers accept mail this machine sends as DOMAIN?

The sending side's counterpart of ``mailstrom check`` (which looks at a receiving
domain). The checks live in :mod:`mailstrom.doctor`; this module turns options and
settings into a :class:`~mailstrom.doctor.SenderSetup`, prints the report and chooses
the exit code.

Exit codes: the verdict in the monitoring-plugin convention (Nagios, Icinga, Sensu), so
the command can run as a check — 0 every check passed, 1 warnings, 2 failures — and
the CLI's sysexits where no verdict could be reached: 75 (EX_TEMPFAIL) when lookups failed
temporarily and nothing failed outright, 69 (EX_UNAVAILABLE) when the ``doctor`` extra is
not installed, 64 usage, 78 configuration.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import TYPE_CHECKING, Any

from mailstrom.cli.context import settings_from
from mailstrom.cli.exits import EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE, CLIError
from mailstrom.cli.output import echo, print_json, print_table, to_jsonable
from mailstrom.cli.parsing import Subparsers, setting_arg
from mailstrom.doctor.dnsbl import DEFAULT_DNSBLS
from mailstrom.doctor.lookup import public_form
from mailstrom.doctor.outgoing import DEFAULT_PROBE, split_probe
from mailstrom.doctor.report import Status
from mailstrom.domains import ldh_domain_name, shown
from mailstrom.errors import ConfigError
from mailstrom.settings import KEYS

if TYPE_CHECKING:
    from mailstrom.doctor import DKIMKey, DoctorReport

EX_WARN = 1
"""Some check warned, none failed (monitoring plugins' WARNING)."""
EX_FAIL = 2
"""Some check failed (monitoring plugins' CRITICAL)."""

EPILOG = f"""\
examples:
  mailstrom doctor example.com
  mailstrom doctor --ip 203.0.113.5 --bulk example.com
  mailstrom doctor --dkim example.com:s2025:/etc/mailstrom/dkim.pem example.com
  mailstrom doctor --json example.com | jq '.checks[] | select(.status != "pass")'

The port 25 probe connects to the first MX host of {DEFAULT_PROBE} (reads its greeting,
says QUIT; no mail is sent) unless --probe or doctor.probe names another.

exit code: 0 every check passed, 1 warnings only, 2 a check failed (the monitoring
plugin convention), 75 a lookup failed temporarily and nothing failed, 69 the doctor
extra is missing ({"pip install 'mailstrom[doctor]'"}).
"""


def register(sub: Subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "doctor",
        parents=parents,
        help="check that receivers will accept mail sent as a domain",
        description="Check what receivers such as Gmail look at before accepting mail from "
        "this machine for DOMAIN: the outgoing address and outbound port 25, reverse DNS "
        "of the address and the HELO name, SPF, that DOMAIN takes mail (MX), the published "
        "DKIM keys, DMARC policy and "
        "alignment, and DNS blocklists. Each check passes, warns or fails, with the "
        "exact fix (the DNS record to publish). Sends no mail.",
        epilog=EPILOG,
    )
    p.add_argument(
        "domain",
        type=_domain_arg,
        help="the sending domain (From address domain), or an address",
    )
    p.add_argument(
        "--ip",
        metavar="ADDRESS",
        type=_ip_arg,
        help="the address receivers see (default: the one this machine routes from; give "
        "it behind NAT or for a relay)",
    )
    p.add_argument(
        "--probe",
        metavar="HOST[:PORT]",
        type=_probe_arg,
        help=f"SMTP server (or mail domain: its first MX) to test outbound port 25 "
        f"against (default: doctor.probe, else {DEFAULT_PROBE})",
    )
    p.add_argument(
        "--dkim",
        metavar="DOMAIN:SELECTOR:KEYFILE[:ALG]",
        action="append",
        type=_dkim_arg,
        help="check this DKIM key instead of the configured ones (repeatable; ALG "
        "rsa-sha256 or ed25519-sha256; KEYFILE may hold ':')",
    )
    p.add_argument(
        "--dnsbl",
        metavar="ZONE",
        action="append",
        type=_zone_arg,
        help="query this blocklist instead of the configured ones (repeatable; default: "
        f"doctor.dnsbls, else {', '.join(DEFAULT_DNSBLS)})",
    )
    p.add_argument("--no-dnsbl", action="store_true", help="query no blocklist")
    p.add_argument(
        "--bulk",
        action="store_true",
        help="judge as a bulk sender (Gmail: over 5,000 messages a day): DKIM and DMARC "
        "required, p=none warned about",
    )
    p.add_argument(
        "--time-limit",
        metavar="SECONDS",
        type=setting_arg("doctor.time_limit", "--time-limit"),
        help="how long the whole run may take (seconds or a duration such as 2m; default: "
        "doctor.time_limit, else 60): checks not finished by then warn",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=doctor_command)


def _domain_arg(text: str) -> str:
    """The domain of ``DOMAIN`` (or of an address), as a lower-case A-label. The doctor
    judges a sending domain: a name that is no RFC 5321 Domain cannot be one, and would
    only get nonsense verdicts (or a "temporary" DNS error for an over-long label)."""
    try:
        return ldh_domain_name(text.rpartition("@")[2])
    except ValueError as exc:
        where = f" (the domain of {shown(text)})" if "@" in text else ""
        raise argparse.ArgumentTypeError(f"{exc}{where}") from None


def _zone_arg(text: str) -> str:
    """A blocklist zone, as a lower-case A-label. A malformed one (``zen..spamhaus.org``,
    a space) could never be queried: each lookup failed as a "temporary" DNS error (exit
    75, however often the doctor ran again), or went out with the space escaped."""
    try:
        return ldh_domain_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ip_arg(text: str) -> str:
    try:
        return public_form(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _probe_arg(text: str) -> str:
    try:
        split_probe(text, 25)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _dkim_arg(text: str) -> DKIMKey:
    from mailstrom.dkim.keys import check_selector, record_name, signing_domain
    from mailstrom.doctor import DKIMKey

    # A domain and a selector hold no ":", a key file's path may (/srv/a:b/k.pem, or
    # C:\keys\k.pem): split from the left twice, and take what follows the path's last
    # ":" as the algorithm only when it names one. Split at every ":", such paths were
    # cut, their tail read as an unknown algorithm.
    parts = text.split(":", 2)
    if len(parts) != 3 or not all(parts) or parts[2].endswith(":"):
        raise argparse.ArgumentTypeError(
            f"expected DOMAIN:SELECTOR:KEYFILE[:ALGORITHM], got {shown(text)}"
        )
    path, colon, last = parts[2].rpartition(":")
    algorithm = "rsa-sha256"
    if colon and path and last.strip().lower() in ALGORITHMS:
        algorithm = last
    elif colon and path and _meant_as_algorithm(parts[2], path, last):
        # Read as part of the path, a mistyped algorithm ("rsa-sha265") ran every check
        # and failed the key for a file that could not be read, not for the typo.
        raise argparse.ArgumentTypeError(
            f"unknown algorithm {shown(last)} in {shown(text)}: expected rsa-sha256 or "
            f"ed25519-sha256 (and there is no key file {shown(parts[2])})"
        )
    else:
        path = parts[2]
    try:  # the checks the signer makes of a configured key's names
        domain = signing_domain(parts[0], label="DOMAIN")
        check_selector(parts[1], label="SELECTOR")
        record_name(domain, parts[1], label="SELECTOR")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return DKIMKey(domain=domain, selector=parts[1], private_key=path, algorithm=algorithm)


ALGORITHMS = ("rsa-sha256", "ed25519-sha256", "rsa", "ed25519")
"""The names ``--dkim``'s ALGORITHM takes, in any case (those the doctor's check takes)."""
_NAME_LIKE = re.compile(r"[A-Za-z0-9-]{1,40}\Z")
"""What an ALGORITHM typed wrong looks like: a name, not the tail of a path (``b/k.pem``,
``\\keys\\k.pem``)."""


def _meant_as_algorithm(whole: str, path: str, last: str) -> bool:
    """Whether ``last``, after ``whole``'s final ":", was meant as an ALGORITHM that names
    none: ``whole`` is no file, and ``path`` before it is one or ``last`` reads as a name.
    A key file whose name holds ":" is kept whole when it exists (and a folder's, such as
    ``/srv/a:b/k.pem`` with a folder ``/srv/a``, is a path whatever exists)."""
    if os.path.lexists(whole):
        return False
    return os.path.isfile(path) or _NAME_LIKE.match(last) is not None


def _setting(values: Any, key: str) -> Any:
    raw = values.get(key)
    return None if raw is None else KEYS[key](key, raw)


def doctor_command(args: argparse.Namespace) -> int:
    # The checks are loaded when asked for, not by every command's start-up.
    from mailstrom.doctor import DNSResolver, MissingExtra, SenderSetup, run_doctor

    settings = settings_from(args)
    config = settings.config
    probe = args.probe or _setting(settings.values, "doctor.probe")
    if probe is not None and args.probe is None:
        try:
            split_probe(probe, config.smtp_port)
        except ValueError as exc:
            raise ConfigError(f"doctor.probe: {exc}") from None
    dnsbls = args.dnsbl
    if dnsbls is None and not args.no_dnsbl:
        dnsbls = _setting(settings.values, "doctor.dnsbls")
        try:  # as --dnsbl is checked, with the setting named
            dnsbls = None if dnsbls is None else [_zone_arg(zone) for zone in dnsbls]
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"doctor.dnsbls: {exc}") from None
    time_limit = (
        KEYS["doctor.time_limit"]("--time-limit", args.time_limit)
        if args.time_limit is not None
        else _setting(settings.values, "doctor.time_limit")
    )
    setup = SenderSetup.from_config(
        config,
        domain=args.domain,
        ip=args.ip,
        probe=probe,
        dkim_keys=tuple(args.dkim) if args.dkim else None,
        dnsbls=() if args.no_dnsbl else (tuple(dnsbls) if dnsbls is not None else None),
        bulk=args.bulk,
        time_limit=time_limit,
    )
    resolver = DNSResolver(config.dns)
    if not resolver.nameservers:
        # Every lookup would fail at once, each check be "unknown" and the verdict "run
        # again later" (75), which no wait changes: the setup is what is wrong.
        raise ConfigError(
            "the doctor has no DNS server to ask: dns.nameservers is not set and the "
            "system names none (/etc/resolv.conf); set dns.nameservers "
            "(MAILSTROM_DNS_NAMESERVERS)"
        )
    try:
        report = run_doctor(setup, resolver)
    except MissingExtra as exc:
        raise CLIError(str(exc), EX_UNAVAILABLE) from None
    if args.json:
        print_json({**to_jsonable(report), "verdict": report.worst.value})
    else:
        print_report(report)
    return exit_code(report)


def exit_code(report: DoctorReport) -> int:
    statuses = {c.status for c in report.checks}
    if Status.FAIL in statuses:
        return EX_FAIL
    if Status.UNKNOWN in statuses:
        return EX_TEMPFAIL
    if Status.WARN in statuses:
        return EX_WARN
    return EX_OK


def print_report(r: DoctorReport) -> None:
    out = sys.stdout
    echo(f"Sender doctor for {r.domain}", out)
    echo(f"  HELO name:        {r.helo_name}", out)
    echo(f"  outgoing address: {', '.join(r.ips) or r.ip or '-'}", out)
    if r.relay:
        echo(f"  relay:            {r.relay} (receivers see the relay's address)", out)
    out.write("\n")
    print_table(
        ["CHECK", "SUBJECT", "STATUS", "RESULT"],
        [(c.name, c.subject, c.status.value.upper(), c.summary) for c in r.checks],
    )
    todo = [c for c in r.checks if c.fix and c.status in (Status.FAIL, Status.WARN)]
    if todo:
        out.write("\nHow to fix:\n")
        for n, c in enumerate(todo, 1):
            # Fixes and details quote DNS records: whatever their publisher wrote.
            echo(f"{n:>3}. [{c.name} {c.subject}] {c.fix}", out)
            for line in c.details:
                echo(f"       - {line}", out)
    verdict = {
        Status.PASS: "every check passed",
        Status.SKIP: "every check passed",
        Status.WARN: "mail should be accepted, but see the warnings",
        Status.UNKNOWN: "some lookups failed for now: run again later",
        Status.FAIL: "receivers will reject or junk this mail until the failures are fixed",
    }[r.worst]
    out.write(f"\nVerdict: {verdict}\n")

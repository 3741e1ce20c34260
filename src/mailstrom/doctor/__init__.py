"""The sender doctor: will receivers accept mail this machine sends for a domain?

It checks, each with pass / warn / fail and the fix: the outgoing address and whether
outbound port 25 is open, forward-confirmed reverse DNS of the address and the HELO
name, SPF (RFC 7208, evaluated by pyspf), that the domain takes mail (MX, no null MX),
the published DKIM keys against the configured private keys, DMARC (RFC 7489) policy
and alignment, DNS blocklists, and that mail to the big mailbox providers is not
configured to go out without TLS. Every lookup
goes through an injected :class:`Resolver` (the configured nameservers in the CLI), every
connection through an injected :class:`Network`.

Needs the ``doctor`` extra (``pip install 'mailstrom[doctor]'``); delivery does not.

>>> from mailstrom.config import DNSConfig
>>> setup = SenderSetup(domain="example.com", helo_name="mail.example.com",
...                     ip="192.0.2.10", dnsbls=())
>>> resolver = DNSResolver(DNSConfig(nameservers=("127.0.0.1",), port=5353))
>>> # report = run_doctor(setup, resolver)
"""

from typing import TYPE_CHECKING

from mailstrom._lazy import lazy_exports

if TYPE_CHECKING:
    from mailstrom.doctor.dkim import DKIMKey
    from mailstrom.doctor.dnsbl import DEFAULT_DNSBLS
    from mailstrom.doctor.extras import INSTALL, MissingExtra
    from mailstrom.doctor.lookup import Answer, DNSResolver, Outcome, Resolver
    from mailstrom.doctor.network import Network, Probe, SocketNetwork
    from mailstrom.doctor.outgoing import DEFAULT_PROBE, split_probe
    from mailstrom.doctor.report import Check, DoctorReport, Status
    from mailstrom.doctor.run import SenderSetup, dkim_keys, run_doctor


__all__ = [
    "DEFAULT_DNSBLS",
    "DEFAULT_PROBE",
    "INSTALL",
    "Answer",
    "Check",
    "DKIMKey",
    "DNSResolver",
    "DoctorReport",
    "MissingExtra",
    "Network",
    "Outcome",
    "Probe",
    "Resolver",
    "SenderSetup",
    "SocketNetwork",
    "Status",
    "dkim_keys",
    "run_doctor",
    "split_probe",
]

# Loaded on first use (PEP 562): importing the package costs only what is touched.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "mailstrom.doctor.dkim": ("DKIMKey",),
        "mailstrom.doctor.dnsbl": ("DEFAULT_DNSBLS",),
        "mailstrom.doctor.extras": (
            "INSTALL",
            "MissingExtra",
        ),
        "mailstrom.doctor.lookup": (
            "Answer",
            "DNSResolver",
            "Outcome",
            "Resolver",
        ),
        "mailstrom.doctor.network": (
            "Network",
            "Probe",
            "SocketNetwork",
        ),
        "mailstrom.doctor.outgoing": (
            "DEFAULT_PROBE",
            "split_probe",
        ),
        "mailstrom.doctor.report": (
            "Check",
            "DoctorReport",
            "Status",
        ),
        "mailstrom.doctor.run": (
            "SenderSetup",
            "dkim_keys",
            "run_doctor",
        ),
    },
)

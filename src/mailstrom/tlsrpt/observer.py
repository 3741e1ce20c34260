"""Counting how every new connection's TLS went, per policy domain, for TLS reports.

The delivery engine tells :class:`SessionObserver` about each connection it opens to a
recipient domain's MX host: the :class:`~mailstrom.tls.requirement.TLSRequirement` it was
opened under and either the connection or the error that stopped it. The requirement's
source says which RFC 8460 ``policy-type`` the session counts under:

* ``mta-sts`` → ``sts``, counted by the MTA-STS source itself
  (:meth:`~mailstrom.mtasts.hook.MTASTSHook.observe`, which knows the policy text);
* ``dane`` → ``tlsa``, the host's TLSA records as the policy;
* anything else that is about the recipient's own MX (the global ``tls``, a
  ``tls.domains`` entry, remembered broken TLS, ``TLS-Required: No``) →
  ``no-policy-found``: no published policy was applied.

A session counts as successful when TLS was established, and as a failure of an RFC 8460
§4.3 type when it was not: the server offered no STARTTLS (``starttls-not-supported``),
a handshake or certificate check failed (the types of
:func:`~mailstrom.tlsrpt.recorder.classify`), or TLS was skipped because the host's
handshake failed recently; under a host's validated TLSA records none of which is usable
for SMTP, an established session is a ``tlsa-invalid`` failure of that DANE policy; and
a host not used because its TLSA lookup failed is a ``dnssec-invalid`` one, and one
``dane-only`` refused for want of usable validated TLSA records a ``dane-required`` one
(:meth:`SessionObserver.dane_failed`).
Connections through a relay, and those the operator asked to
be plaintext (``none``), are no TLS session with the recipient's MX and are not counted;
neither are failures with nothing to do with TLS (refused, timed out before STARTTLS),
nor the connections that carry a mailed TLS report (RFC 8460 §3: they SHOULD NOT be in
the next report), which the dispatcher does not tell of, nor their hosts' failed TLSA
lookups.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailstrom.errors import DaneRequired, DeliveryError, LocalResourceShortage
from mailstrom.mtasts.fetch import a_label
from mailstrom.tls.requirement import PolicySource, TLSMode, TLSRequirement
from mailstrom.tlsrpt.recorder import REFUSED_CODE, SessionRecorder, classify, handshake_code
from mailstrom.tlsrpt.sessions import PolicyType, ResultType

if TYPE_CHECKING:
    from mailstrom.mtasts.hook import MTASTSHook
    from mailstrom.runtime.connection import SMTPConnection
    from mailstrom.tls.decide import Destination

REMEMBERED_CODE = "tls-handshake-failed-recently"
"""The ``failure-reason-code`` of a session sent in plaintext at once because the host's
TLS handshake failed recently (``tls.remember_broken``)."""
TLSA_LOOKUP_CODE = "tlsa-lookup-failed"
"""The ``failure-reason-code`` of a host not used because its TLSA lookup failed: one code
for every such failure, as the lookup's own error names a port, a time taken, and would
make each attempt a counter (and a failure detail) of its own."""
NO_USABLE_TLSA_CODE = "no-usable-tlsa-records"
"""The ``failure-reason-code`` of a session under validated TLSA records none of which is
usable for SMTP (RFC 7672 §2.2: TLS is mandatory then, but unauthenticated), and of a
host ``dane-only`` refused for such records."""
NO_VALIDATED_TLSA_CODE = "no-validated-tlsa-records"
"""The ``failure-reason-code`` of a host ``dane-only`` refused because it has no
DNSSEC-validated TLSA records (none at all, or records or MX records not validated)."""

_NOT_COUNTED = frozenset({PolicySource.RELAY})
"""Sources whose connections do not go to the recipient domain's MX."""


class SessionObserver:
    """Counts each connection's TLS outcome in a :class:`SessionRecorder` (see the module
    docstring); give it to the engine as its ``observe_tls``."""

    def __init__(self, recorder: SessionRecorder, *, mta_sts: MTASTSHook | None = None) -> None:
        self._recorder = recorder
        self._mta_sts = mta_sts

    def __call__(
        self,
        domain: str,
        requirement: TLSRequirement,
        host: str,
        ip: str,
        outcome: DeliveryError | SMTPConnection,
    ) -> None:
        """Count one connection attempt to ``host`` (``ip``) for ``domain``: ``outcome``
        is the opened connection or the error that stopped it."""
        source = requirement.source
        if source in _NOT_COUNTED:
            return
        error = outcome if isinstance(outcome, DeliveryError) else None
        if source is PolicySource.MTA_STS:
            if self._mta_sts is not None:
                self._mta_sts.observe(domain, requirement, host, ip, error)
            return
        name = a_label(domain)
        if name is None:  # an address literal: no domain to report to
            return
        if source is PolicySource.DANE:
            policy_type = PolicyType.TLSA
            # Sorted: resolvers rotate an RRset's order, and the same records in another
            # order would be another policy (its own counters, its own report entry).
            policy = "\n".join(sorted(str(r) for r in requirement.tlsa))
        elif requirement.mode is TLSMode.NONE and source is not PolicySource.REMEMBERED:
            return  # plaintext by the operator's choice: no TLS was attempted
        elif (
            source is PolicySource.REMEMBERED
            and requirement.detail == PolicySource.MTA_STS
            and self._mta_sts is not None
        ):
            # MTA-STS testing with an unlisted MX whose TLS is remembered broken: a
            # session with the policy's failure, which the MTA-STS source counts. Only
            # that one: a session the policy was not applied to (TLS-Required: No skips
            # it) is no-policy-found below. Asked of the requirement, not of the source's
            # last decision for the domain: that one may have been another message's.
            self._mta_sts.observe(domain, requirement, host, ip, error)
            return
        else:
            policy_type, policy = PolicyType.NO_POLICY, ""
        found = _failure(requirement, outcome)
        if found is None and error is None and policy_type is PolicyType.TLSA and not policy:
            # DANE applied with no usable record (the requirement has none): TLS went, but
            # the domain's policy failed, "tlsa-invalid" (RFC 8460 §4.3.2: none of the
            # records was valid). As a success, the report hid it from the domain.
            found = ResultType.TLSA_INVALID, NO_USABLE_TLSA_CODE
        if found is None:
            if error is None:
                self._recorder.success(name, policy_type, policy, mx=_mx(policy_type, host))
            return
        kind, code = found
        self._recorder.failure(name, policy_type, policy, kind, mx=host, ip=ip, code=code)

    def dane_failed(self, destination: Destination, error: DeliveryError) -> None:
        """Count a host of ``destination`` that DANE left unused, under the domain's DANE
        policy, whose records are not known or of no use
        (:attr:`~mailstrom.tls.dane.DaneSource.on_failure`): a TLSA lookup that failed
        (SERVFAIL: a bogus signature, or no answer; RFC 7672 §2.2), which RFC 8460 §4.3.2
        names ``dnssec-invalid``, or ``dane-only``'s refusal of a host without usable
        validated TLSA records (:class:`~mailstrom.errors.DaneRequired`), its
        ``dane-required``. Not for a mailed report (``dane-only`` looks its host's TLSA
        records up all the same): RFC 8460 §3 leaves its sessions out of the next report,
        as its connections are."""
        name = a_label(destination.domain)
        if name is None or destination.tls_report or isinstance(error, LocalResourceShortage):
            return  # (a lookup this host had no socket for says nothing of the domain's)
        if isinstance(error, DaneRequired):
            kind = ResultType.DANE_REQUIRED
            code = NO_USABLE_TLSA_CODE if error.unusable else NO_VALIDATED_TLSA_CODE
        else:
            kind, code = ResultType.DNSSEC_INVALID, TLSA_LOOKUP_CODE
        self._recorder.failure(name, PolicyType.TLSA, "", kind, mx=destination.mx_host, code=code)


def _mx(policy_type: PolicyType, host: str) -> str:
    # TLSA records belong to one host: its successes are counted per host, so that the
    # report can name the policy's mx-host. Other successes need no host (one counter).
    return host if policy_type is PolicyType.TLSA else ""


def _failure(
    requirement: TLSRequirement, outcome: DeliveryError | SMTPConnection
) -> tuple[ResultType, str] | None:
    """The RFC 8460 failure of a connection attempt, or None when TLS was established (or
    the failure was not about TLS, for an error)."""
    if isinstance(outcome, DeliveryError):
        return classify(outcome)
    if outcome.tls_version is not None:
        return None
    if outcome.tls_fallback is not None:
        # The handshake failed and the opener delivered in plaintext on a new connection.
        return classify(outcome.tls_fallback) or (
            ResultType.VALIDATION_FAILURE,
            handshake_code(outcome.tls_fallback.__cause__),
        )
    if requirement.source is PolicySource.REMEMBERED:
        return ResultType.VALIDATION_FAILURE, REMEMBERED_CODE
    if "STARTTLS" in outcome.extensions:
        return ResultType.STARTTLS_NOT_SUPPORTED, REFUSED_CODE
    return ResultType.STARTTLS_NOT_SUPPORTED, ""

"""Rows of the MTA-STS policy cache and the TLS session counters, shared by the SQLite and
PostgreSQL stores (SQLite keeps times as microseconds, PostgreSQL as timestamps)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime

from mailstrom.arguments import member_of, shown
from mailstrom.errors import UnreadableRow
from mailstrom.mtasts.policy import CachedPolicy, Mode, Policy
from mailstrom.stores.side_rows import unreadable_side_row
from mailstrom.stores.sqlite_schema import time_at
from mailstrom.tlsrpt.sessions import PolicyType, TLSSessions


def _when(value: object, column: str) -> datetime:
    """A time as either store reads it: a datetime (PostgreSQL; None for one the driver
    cannot hold, see rows.ReadableTimes) or microseconds (SQLite)."""
    if isinstance(value, datetime):
        return value
    if value is None:
        raise UnreadableRow(f"{column} is out of range")
    return time_at(value, column)


def policy_from_row(row: Sequence[object]) -> CachedPolicy:
    """A cached policy from (domain, policy_id, mode, mx, max_age, policy_text, fetched_at,
    expires_at); times as microseconds (SQLite) or datetimes (PostgreSQL).

    UnreadableRow for a row that cannot be read as written: the MTA-STS source then has no
    cached policy (as on first contact: it fetches the policy, and writes it over this
    row), rather than stopping on it or applying a policy it can only guess at."""
    domain, policy_id, mode, mx, max_age, text, fetched_at, expires_at = row
    known = member_of(Mode, mode)
    if known is None:
        raise UnreadableRow(f"MTA-STS policy of {shown(domain)}: mode {shown(mode)}")
    if type(max_age) is not int:
        raise UnreadableRow(f"MTA-STS policy of {shown(domain)}: max_age {shown(max_age)}")
    try:
        fetched, expires = _when(fetched_at, "fetched_at"), _when(expires_at, "expires_at")
    except UnreadableRow as exc:
        raise UnreadableRow(f"MTA-STS policy of {shown(domain)}: {exc}") from None
    policy = Policy(
        mode=known,
        mx=tuple(str(mx).split("\n")) if mx else (),
        max_age=max_age,
        text=str(text),
    )
    return CachedPolicy(
        domain=str(domain),
        policy_id=str(policy_id),
        policy=policy,
        fetched_at=fetched,
        expires_at=expires,
    )


def policy_params(cached: CachedPolicy) -> tuple[object, ...]:
    policy = cached.policy
    return (
        cached.domain.lower(),
        cached.policy_id,
        policy.mode.value,
        "\n".join(policy.mx),
        policy.max_age,
        policy.text,
    )


def session_params(s: TLSSessions) -> tuple[object, ...]:
    key = s.key()
    return (*key[:4], s.policy_string, *key[4:], s.count)


def session_from_row(row: Sequence[object]) -> TLSSessions | None:
    """Counters from the columns of :data:`_SESSION_COLUMNS`, ``policy_hash`` included;
    None, with a warning, for a row that cannot be read as written (left out of the
    report: a report without one counter beats no report)."""
    day, domain, ptype, _hash, text, result, sending, mx, ip, code, count = row
    kind = member_of(PolicyType, ptype)
    try:
        if kind is None:
            raise ValueError(f"policy_type {shown(ptype)}")
        if type(count) is not int:
            raise ValueError(f"count {shown(count)}")
        return TLSSessions(
            day=day if isinstance(day, date) else date.fromisoformat(str(day)),
            policy_domain=str(domain),
            policy_type=kind,
            policy_string=str(text),
            result_type=str(result),
            sending_ip=str(sending),
            receiving_mx=str(mx),
            receiving_ip=str(ip),
            failure_code=str(code),
            count=count,
        )
    except ValueError as exc:
        unreadable_side_row("tls_sessions", f"{day} {domain}", exc, "left out of the report")
        return None

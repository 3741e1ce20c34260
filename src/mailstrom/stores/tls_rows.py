"""Rows of the MTA-STS policy cache and the TLS session counters, shared by the SQLite and
PostgreSQL stores (SQLite keeps times as microseconds, PostgreSQL as timestamps)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime

from mailstrom.mtasts.policy import CachedPolicy, Mode, Policy
from mailstrom.stores.sqlite_schema import from_us
from mailstrom.tlsrpt.sessions import PolicyType, TLSSessions


def _when(value: object) -> datetime:
    if isinstance(value, datetime):
        return value
    return from_us(int(str(value)))


def policy_from_row(row: Sequence[object]) -> CachedPolicy:
    """A cached policy from (domain, policy_id, mode, mx, max_age, policy_text, fetched_at,
    expires_at); times as microseconds (SQLite) or datetimes (PostgreSQL)."""
    domain, policy_id, mode, mx, max_age, text, fetched_at, expires_at = row
    policy = Policy(
        mode=Mode(str(mode)),
        mx=tuple(str(mx).split("\n")) if mx else (),
        max_age=int(str(max_age)),
        text=str(text),
    )
    return CachedPolicy(
        domain=str(domain),
        policy_id=str(policy_id),
        policy=policy,
        fetched_at=_when(fetched_at),
        expires_at=_when(expires_at),
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


def session_from_row(row: Sequence[object]) -> TLSSessions:
    """Counters from the columns of :data:`_SESSION_COLUMNS`, ``policy_hash`` included."""
    day, domain, ptype, _hash, text, result, sending, mx, ip, code, count = row
    return TLSSessions(
        day=day if isinstance(day, date) else date.fromisoformat(str(day)),
        policy_domain=str(domain),
        policy_type=PolicyType(str(ptype)),
        policy_string=str(text),
        result_type=str(result),
        sending_ip=str(sending),
        receiving_mx=str(mx),
        receiving_ip=str(ip),
        failure_code=str(code),
        count=int(str(count)),
    )

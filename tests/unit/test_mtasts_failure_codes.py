"""The ``failure-reason-code`` of an unusable MTA-STS record or policy: a short name of the
kind of failure, never text of the record or policy (each variant of one failure was a
failure detail of its own in a TLS report, and a counter of its own in a worker)."""

from __future__ import annotations

import re
from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st

from mailstrom.mtasts.policy import PolicyError, parse_policy, parse_sts_record

CODE = re.compile(r"sts-[a-z0-9-]{1,40}")

_LINES = st.sampled_from(
    [
        "version: STSv1",
        "version: STSv2",
        "mode: enforce",
        "mode: strict",
        "max_age: 86400",
        "max_age: soon",
        "mx: mx1.example.org",
        "mx: .bad",
        " mode: testing",
        "junk",
        "x" * 1100,
        "mode: \x01",
        "",
    ]
)


def code_of(parse: Callable[[], object]) -> str:
    """The code of the PolicyError ``parse`` raises, or a valid one when it raises none."""
    try:
        parse()
    except PolicyError as exc:
        return exc.code
    return "sts-none"


@given(st.lists(_LINES | st.text(max_size=30), max_size=8))
def test_a_policy_failure_code_is_a_fixed_name(lines: list[str]) -> None:
    code = code_of(lambda: parse_policy("\n".join(lines).encode("utf-8", "surrogatepass")))
    assert CODE.fullmatch(code), code


@given(st.lists(st.sampled_from(["v=STSv1", "id=one", "id=ä", "id", "junk", ""]) | st.text()))
def test_a_record_failure_code_is_a_fixed_name(fields: list[str]) -> None:
    records = ["v=STSv1;" + ";".join(fields), "v=STSv1" * (len(fields) % 2)]
    code = code_of(lambda: parse_sts_record(records))
    assert CODE.fullmatch(code), code


def test_a_policy_error_without_a_code_has_its_result_type() -> None:
    assert PolicyError("why").code == "sts-policy-invalid"
    assert PolicyError("why", result_type="sts-policy-fetch-error").code == (
        "sts-policy-fetch-error"
    )

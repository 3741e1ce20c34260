"""The dispatcher looks at every reply of a transaction for a throttling one, in the
order they came."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mailstrom.policy.throttle import is_throttling
from mailstrom.runtime.dispatch import _replies
from mailstrom.runtime.transactions import TransactionResult
from mailstrom.status import SMTPReply

_REPLIES = st.builds(
    SMTPReply,
    code=st.sampled_from([250, 354, 421, 450, 451, 452, 550, 554]),
    text=st.sampled_from(["ok", "rate limited, slow down", "try again later"]),
    enhanced=st.sampled_from([None, "2.0.0", "4.7.28", "4.7.650", "4.3.2", "5.1.1"]),
)
_MAYBE = st.none() | _REPLIES


@given(
    _MAYBE,
    st.lists(st.tuples(st.sampled_from(["a@x.test", "b@x.test"]), _REPLIES), max_size=3),
    _MAYBE,
    _MAYBE,
)
def test_every_reply_is_looked_at_in_order(
    mail: SMTPReply | None,
    rcpt: list[tuple[str, SMTPReply]],
    data: SMTPReply | None,
    final: SMTPReply | None,
) -> None:
    result = TransactionResult(mail=mail, rcpt=tuple(rcpt), data=data, final=final)
    replies = [mail, *(reply for _, reply in rcpt), data, final]
    assert list(_replies(result)) == replies
    assert any(is_throttling(r) for r in _replies(result)) == any(
        r is not None and r.code in (421, 451) and is_throttling(r) for r in replies
    )

from mailstrom.status import RecipientState, derive_message_state

Q, D, OK, F = (
    RecipientState.QUEUED,
    RecipientState.DEFERRED,
    RecipientState.DELIVERED,
    RecipientState.FAILED,
)


def test_pending_recipients_keep_message_open() -> None:
    assert derive_message_state([OK, Q]) is Q
    assert derive_message_state([OK, D, Q]) is D


def test_all_final() -> None:
    assert derive_message_state([OK, OK]) is OK
    assert derive_message_state([OK, F]) is F


def test_states_are_stored_strings() -> None:
    assert [s.value for s in RecipientState] == ["queued", "deferred", "delivered", "failed"]

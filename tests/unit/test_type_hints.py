"""What the library hands back can be introspected: ``typing.get_type_hints`` resolves every
field of the status, event and message types, as serialisers (pydantic, FastAPI's response
models, cattrs...) ask before they turn a :class:`~mailstrom.MessageStatus` into JSON.

An annotation naming a type imported only under ``TYPE_CHECKING`` breaks that with a
NameError at the user's first request, not in our type checks; hence this test.
"""

from __future__ import annotations

import dataclasses
import typing
from types import ModuleType

import pytest

import mailstrom
import mailstrom.message.prepared
import mailstrom.status

INPUTS_ONLY = {"Config"}
"""Built by the caller, never returned: Config names ``DKIMConfig`` only for the type
checker, so that every process that reads a configuration does not load the DKIM signing
code."""


def dataclasses_of(module: ModuleType) -> list[type]:
    return [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and dataclasses.is_dataclass(value)
        and value.__module__ == module.__name__
    ]


RETURNED = sorted(
    {
        *dataclasses_of(mailstrom.status),
        *dataclasses_of(mailstrom.message.prepared),
        *(
            value
            for name in mailstrom.__all__
            if name not in INPUTS_ONLY
            and isinstance(value := getattr(mailstrom, name), type)
            and dataclasses.is_dataclass(value)
        ),
    },
    key=lambda cls: cls.__qualname__,
)


def test_the_list_covers_what_query_status_returns() -> None:
    names = {cls.__name__ for cls in RETURNED}
    assert {"MessageStatus", "RecipientStatus", "Attempt", "DKIMStatus"} <= names
    assert {"DeliveryEvent", "WorkerStatus", "PreparedMessage"} <= names


@pytest.mark.parametrize("cls", RETURNED, ids=lambda cls: cls.__qualname__)
def test_every_field_annotation_resolves(cls: type) -> None:
    hints = typing.get_type_hints(cls)
    assert {f.name for f in dataclasses.fields(cls)} <= set(hints)


def test_a_signed_status_names_its_signature_type() -> None:
    hints = typing.get_type_hints(mailstrom.DKIMStatus)
    assert hints["signatures"] == tuple[mailstrom.DKIMSignature, ...]

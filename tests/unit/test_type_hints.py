"""What the library takes and hands back can be introspected: ``typing.get_type_hints``
resolves every field of the status, event, message and configuration types, as serialisers
(pydantic, FastAPI's response models, cattrs...) ask before they turn a
:class:`~mailstrom.MessageStatus` into JSON or build a :class:`~mailstrom.Config` from a
settings file.

An annotation naming a type imported only under ``TYPE_CHECKING`` breaks that with a
NameError at the user's first request, not in our type checks; hence this test.
"""

from __future__ import annotations

import dataclasses
import typing
from types import ModuleType

import pytest

import mailstrom
import mailstrom.config
import mailstrom.message.prepared
import mailstrom.status


def dataclasses_of(module: ModuleType) -> list[type]:
    return [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and dataclasses.is_dataclass(value)
        and value.__module__ == module.__name__
    ]


PUBLIC = sorted(
    {
        *dataclasses_of(mailstrom.status),
        *dataclasses_of(mailstrom.message.prepared),
        *dataclasses_of(mailstrom.config),
        *(
            value
            for name in mailstrom.__all__
            if isinstance(value := getattr(mailstrom, name), type)
            and dataclasses.is_dataclass(value)
        ),
    },
    key=lambda cls: cls.__qualname__,
)


def test_the_list_covers_what_query_status_returns_and_what_configures() -> None:
    names = {cls.__name__ for cls in PUBLIC}
    assert {"MessageStatus", "RecipientStatus", "Attempt", "DKIMStatus"} <= names
    assert {"DeliveryEvent", "WorkerStatus", "PreparedMessage"} <= names
    assert {"Config", "DKIMConfig", "DKIMKey", "Timeouts", "HookConfig"} <= names


@pytest.mark.parametrize("cls", PUBLIC, ids=lambda cls: cls.__qualname__)
def test_every_field_annotation_resolves(cls: type) -> None:
    hints = typing.get_type_hints(cls)
    assert {f.name for f in dataclasses.fields(cls)} <= set(hints)


def test_a_signed_status_names_its_signature_type() -> None:
    hints = typing.get_type_hints(mailstrom.DKIMStatus)
    assert hints["signatures"] == tuple[mailstrom.DKIMSignature, ...]


def test_a_config_names_its_dkim_settings_type() -> None:
    hints = typing.get_type_hints(mailstrom.Config)
    assert hints["dkim"] == mailstrom.DKIMConfig | None

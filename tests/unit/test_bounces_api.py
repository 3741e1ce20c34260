"""The public names of :mod:`mailstrom.bounces`: every type its functions take or hand
back, and every type those carry in their fields, can be imported from a public package,
so that a caller can annotate and compare what it gets (``outcome.action is
BounceAction.FAILED``) without reaching into a private module."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator

import mailstrom
import mailstrom.bounces
import mailstrom.stores

PUBLIC_PACKAGES = (mailstrom, mailstrom.bounces, mailstrom.stores)


def named_types(hint: object) -> Iterator[type]:
    """The classes an annotation names, through unions and generics."""
    if isinstance(hint, type) and not typing.get_args(hint):
        yield hint
    for arg in typing.get_args(hint):
        yield from named_types(arg)
    origin = typing.get_origin(hint)
    if isinstance(origin, type):
        yield origin


def reachable_types() -> set[type]:
    """The mailstrom classes met from ``mailstrom.bounces.__all__``, its functions'
    signatures and the fields of the dataclasses among them, transitively."""
    todo: list[object] = [getattr(mailstrom.bounces, n) for n in mailstrom.bounces.__all__]
    seen: set[type] = set()
    while todo:
        value = todo.pop()
        function = callable(value) and not isinstance(value, type)
        if not (function or (isinstance(value, type) and dataclasses.is_dataclass(value))):
            continue  # a constant, or a class whose fields are not annotated (an enum)
        for hint in typing.get_type_hints(value).values():
            for cls in named_types(hint):
                if cls.__module__.startswith("mailstrom.") and cls not in seen:
                    seen.add(cls)
                    todo.append(cls)
    return seen


def test_every_type_of_the_bounce_api_is_exported() -> None:
    exported = {getattr(package, name) for package in PUBLIC_PACKAGES for name in package.__all__}
    found = reachable_types()
    assert {"BounceOutcome", "Report", "ReportedRecipient"} <= {c.__name__ for c in found}
    assert sorted(c.__qualname__ for c in found - exported) == []


def test_bounce_action_is_exported_from_the_package() -> None:
    from mailstrom.bounces import BounceAction, BounceOutcome

    assert typing.get_type_hints(BounceOutcome)["action"] is BounceAction
    assert BounceAction.FAILED == "failed"

"""Every Python example in README.md and docs/ compiles, and every name it imports from
mailstrom exists: a renamed class or module would otherwise leave the documentation
teaching an API that is gone. (docs/testing.md's sample is run whole by
test_docs_testing.py; the other examples need a real MX to run.)"""

from __future__ import annotations

import ast
import importlib
import re
import textwrap
from pathlib import Path

import pytest

import mailstrom

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Indented blocks too (an example inside a list item), dedented.
BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```", re.DOTALL | re.MULTILINE)


def examples() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for block in BLOCK.finditer(text):
            line = text.count("\n", 0, block.start()) + 2  # the code's first line
            code = textwrap.dedent(block.group(2))
            found.append((f"{doc.relative_to(ROOT)}:{line}", code))
    return found


EXAMPLES = examples()


def test_the_documentation_has_examples() -> None:
    assert len(EXAMPLES) >= 20
    assert any(where.startswith("README.md") for where, _ in EXAMPLES)


@pytest.mark.parametrize(("where", "code"), EXAMPLES, ids=[where for where, _ in EXAMPLES])
def test_an_example_compiles_and_its_mailstrom_imports_exist(where: str, code: str) -> None:
    tree = compile(code, where, "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.partition(".")[0] == "mailstrom":
                    importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mailstrom"):
            assert node.module is not None
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    # A submodule not imported by its package yet.
                    importlib.import_module(f"{node.module}.{alias.name}")


# Examples that need nothing but mailstrom (no store, network, key file or name defined
# elsewhere) are run, each known by a line of it: a Config they build that the library
# refuses would teach a configuration that cannot start.
SELF_CONTAINED = [
    ("README.md", "timeouts=Timeouts(connect=30, greeting=300, command=300, data_end=600),"),
    ("docs/guide.md", 'unsubscribe_url="https://example.com/unsubscribe?u=42&t=4f9c",'),
    ("docs/guide.md", "shaping=ShapingConfig("),
    ("docs/guide.md", "Config(tls=TLSPolicy.OPPORTUNISTIC"),
    ("docs/guide.md", 'config = Config(helo_name="mail.example.com", mta_sts=MTASTSConfig())'),
]


@pytest.mark.parametrize(("doc", "line"), SELF_CONTAINED, ids=[line for _, line in SELF_CONTAINED])
def test_a_self_contained_example_runs(doc: str, line: str) -> None:
    [code] = [code for where, code in EXAMPLES if where.startswith(f"{doc}:") and line in code]
    # A snippet may leave out its imports: the names it uses are mailstrom's.
    namespace = {name: getattr(mailstrom, name) for name in mailstrom.__all__}
    exec(compile(code, doc, "exec"), namespace)


def test_the_bounce_example_runs_on_mail_that_is_no_report() -> None:
    """The guide's parse_report/apply_report example says parse_report() answers None for
    mail that is no report (an auto-reply); the lines after it must cope with that."""
    from types import SimpleNamespace

    from mailstrom.stores import MemoryStore

    line = "report = parse_report(raw_bytes)"
    [code] = [
        code for where, code in EXAMPLES if where.startswith("docs/guide.md") and line in code
    ]
    store = MemoryStore()
    auto_reply = b"From: bob@example.org\r\nSubject: Out of office\r\n\r\nAway.\r\n"
    names = {"raw_bytes": auto_reply, "ms": SimpleNamespace(store=store)}
    exec(compile(code, "docs/guide.md", "exec"), names)
    store.close()


def test_every_error_the_documentation_names_is_exported() -> None:
    """The guide tells callers that a store URL it does not know raises `InvalidStoreURL`
    and that `Config(...)` refuses bad values with `ConfigError`: a caller catching them
    writes `from mailstrom import ...`, as for every other error of the documentation."""
    import inspect

    import mailstrom.errors

    errors = {
        name
        for name, value in vars(mailstrom.errors).items()
        if inspect.isclass(value) and issubclass(value, BaseException)
    }
    named = {name for doc in DOCS for name in re.findall(r"`(\w+)`", doc.read_text())}
    missing = sorted((named & errors) - set(mailstrom.__all__))
    assert missing == []
    for name in named & errors:
        assert getattr(mailstrom, name) is getattr(mailstrom.errors, name)


def test_the_guide_says_which_letters_a_tag_may_have() -> None:
    """The guide's tag rule is the code's: ASCII letters only, which it must say (a
    reader takes "letters" to include "é", which every tag check refuses)."""
    from mailstrom.message.attributes import check_tags

    guide = " ".join((ROOT / "docs" / "guide.md").read_text().split())
    assert "characters of ASCII letters, digits and" in guide
    assert check_tags(["Az09._:/@+-"]) == ("Az09._:/@+-",)
    with pytest.raises(mailstrom.InvalidTag):
        check_tags(["é"])


def _accepts(hint: object, value: object) -> bool:
    """Whether a type checker takes the literal ``value`` for a parameter typed ``hint``."""
    import types
    import typing

    origin = typing.get_origin(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:  # int is acceptable where float is expected
        return isinstance(value, int | float) and not isinstance(value, bool)
    target = origin if origin is not None else hint
    return not isinstance(target, type) or isinstance(value, target)


def test_a_literal_an_example_passes_has_the_type_its_parameter_is_typed_with() -> None:
    """An example is what a reader copies into typed code: the guide wrote
    ``Config(tls="opportunistic")`` and ``DKIMKey(algorithm="ed25519-sha256")``, which run
    (the values are converted) but which ``mypy --strict`` refuses, as ``tls`` is typed
    ``TLSPolicy`` and ``algorithm`` ``DKIMAlgorithm``: examples give the enum members."""
    import dataclasses
    import typing

    wrong = []
    for where, code in EXAMPLES:
        tree = compile(
            code, where, "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        )
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            target = (
                getattr(mailstrom, node.func.id, None)
                if node.func.id in mailstrom.__all__
                else None
            )
            if not (isinstance(target, type) and dataclasses.is_dataclass(target)):
                continue
            hints = typing.get_type_hints(target)
            for keyword in node.keywords:
                value = keyword.value
                if (
                    keyword.arg in hints
                    and isinstance(value, ast.Constant)
                    and not _accepts(hints[keyword.arg], value.value)
                ):
                    wrong.append(f"{where}: {node.func.id}({keyword.arg}={value.value!r})")
    assert wrong == []

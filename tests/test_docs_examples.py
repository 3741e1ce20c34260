"""Every Python example in README.md and docs/ compiles, and every name it imports from
mailstrom exists: a renamed class or module would otherwise leave the documentation
teaching an API that is gone. (docs/testing.md's sample is run whole by
test_docs_testing.py; the other examples need a real MX to run.)"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def examples() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for block in BLOCK.finditer(text):
            line = text.count("\n", 0, block.start()) + 2  # the code's first line
            found.append((f"{doc.relative_to(ROOT)}:{line}", block.group(1)))
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

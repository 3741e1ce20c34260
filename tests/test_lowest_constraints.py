"""constraints/lowest.txt (`make test-lowest`) pins each dependency at the lower bound
pyproject.toml gives it, so that bound is one a test run has seen: a bound raised in
pyproject.toml without its pin (or a new dependency without one) fails here."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
TOOLING = {"test", "bench"}
"""Extras of the project's own tooling: any version that works, not pinned."""
FIRST_INSTALLABLE = {
    ("email-validator", Version("2.1")): Version("2.1.0.post1"),  # 2.1.0 was yanked
    ("cryptography", Version("45.0")): Version("45.0.1"),  # 45.0.0 was yanked
    ("publicsuffixlist", Version("0.10")): Version("0.10.0.20230429"),  # dated releases only
}
"""Where a bound's own release is not what pip installs for it, the release it installs."""


def lower_bounds() -> dict[str, Version]:
    """The highest lower bound each runtime or user extra's dependency has (one
    environment holds one version: cryptography's is the dane extra's)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra, listed in project["optional-dependencies"].items():
        if extra not in TOOLING:
            requirements += listed
    bounds: dict[str, Version] = {}
    for text in requirements:
        requirement = Requirement(text)
        [bound] = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        name = canonicalize_name(requirement.name)
        bounds[name] = max(bound, bounds.get(name, bound))
    return bounds


def pins() -> dict[str, Version]:
    text = (ROOT / "constraints" / "lowest.txt").read_text()
    found = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", text, re.MULTILINE)
    return {canonicalize_name(name): Version(version) for name, version in found}


def test_every_lower_bound_is_pinned_at_its_release() -> None:
    pinned = pins()
    for name, bound in lower_bounds().items():
        assert name in pinned, f"{name} has no pin in constraints/lowest.txt"
        expected = FIRST_INSTALLABLE.get((name, bound), bound)
        assert pinned[name] == expected, (
            f"{name}: constraints/lowest.txt pins {pinned[name]}, but pyproject.toml's lower "
            f"bound is {bound} (install {expected})"
        )

"""The release number, in one place: packaging reads it from here (``[tool.hatch.version]``)
and modules import it without importing the whole package."""

__version__ = "0.1.0"

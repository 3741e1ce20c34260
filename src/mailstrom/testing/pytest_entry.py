"""What the ``pytest11`` entry point ``mailstrom`` loads: a pointer, nothing more.

pytest registers an entry point's module under the entry point's name ("mailstrom"), and a
module listed in ``pytest_plugins`` or given as ``-p module`` under its module name; the
same module registered under two names is an error. So the fixtures live in
:mod:`mailstrom.testing.pytest_plugin`, and every way of loading them names that module:
this one through ``pytest_plugins`` (which pytest honours in any plugin module), a
project's conftest.py or ``-p`` directly. pytest then loads it once, whichever comes
first. ``-p no:mailstrom`` turns the entry point off; ``-p mailstrom`` turns it on where
plugin autoloading is disabled.
"""

pytest_plugins = ["mailstrom.testing.pytest_plugin"]

"""``python -m mailstrom``: the ``mailstrom`` command."""

import sys

from mailstrom.cli.main import main

if __name__ == "__main__":
    sys.exit(main())

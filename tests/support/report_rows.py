"""``mailstrom`` with :func:`~mailstrom.tlsrpt.report.build_report` counting the session
rows it is handed: how much work ``mailstrom tlsrpt`` gives it, measured, not timed.

In another process: run ``python -m tests.support.report_rows ARGS...`` (the command line
of ``mailstrom``) with :data:`COUNT_VARIABLE` naming a file; each call of
``build_report`` appends one line to it, the number of session rows it was handed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from datetime import date
from typing import Any

COUNT_VARIABLE = "TEST_REPORT_ROWS_FILE"


def main() -> int:
    """``mailstrom``, its ``build_report`` counting the rows of each call."""
    import mailstrom.tlsrpt.report
    from mailstrom.cli.main import main as mailstrom_main
    from mailstrom.tlsrpt.sessions import TLSSessions

    build_report = mailstrom.tlsrpt.report.build_report
    counts = os.environ[COUNT_VARIABLE]

    def counting(
        policy_domain: str, day: date, sessions: Iterable[TLSSessions], *a: Any, **kw: Any
    ) -> mailstrom.tlsrpt.report.Report:
        rows = list(sessions)
        with open(counts, "a", encoding="ascii") as f:
            f.write(f"{len(rows)}\n")
        return build_report(policy_domain, day, rows, *a, **kw)

    # Looked up when the command runs (it imports build_report then, not at start-up).
    mailstrom.tlsrpt.report.build_report = counting  # type: ignore[assignment]
    return mailstrom_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

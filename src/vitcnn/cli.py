"""What every stage script shares: one-line errors instead of tracebacks, and logging."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable

from vitcnn.errors import UserError


def run_stage(name: str, main: Callable[[], None]) -> None:
    """Run a stage; a user-fixable error or an interrupt ends it with one line and exit != 0.

    Every output is written atomically, so stopping here leaves earlier files intact.
    """
    logging.basicConfig(level=logging.INFO, format=f"{name}: %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops a stage as Ctrl-C does
    try:
        main()
    except UserError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; nothing partial was written (training resumes from its last epoch when rerun)",
              file=sys.stderr)
        sys.exit(130)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt

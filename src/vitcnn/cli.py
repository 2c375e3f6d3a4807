"""What every stage script shares: one-line errors instead of tracebacks, and logging."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from vitcnn.errors import ConfigError, UserError, first_line

OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)")  # how Rust libraries (safetensors) quote an OS error
FULL_BYTES = 1 << 20  # less free space than this under the project: a failed write was the full disk

# What to do about the OS errors a stage meets in practice, beside the OS's own words.
OS_ADVICE = {
    errno.ENOSPC: "free space on that disk (or point TMPDIR or the DVC cache elsewhere), then rerun; if DVC left "
                  "an empty dvc.lock, restore it with `git checkout dvc.lock` first",
    errno.EDQUOT: "your disk quota is used up: free space, then rerun",
    errno.EACCES: "check the file's and its folder's permissions",
    errno.EPERM: "check the file's and its folder's permissions",
    errno.EROFS: "that filesystem is read-only",
    errno.ENOENT: "check the path",
}


def run_stage(name: str, main: Callable[[], None]) -> None:
    """Run a stage; a user-fixable error or an interrupt ends it with one line and exit != 0.

    Every output is written atomically, so stopping here leaves earlier files intact.
    """
    logging.basicConfig(level=logging.INFO, format=f"{name}: %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops a stage as Ctrl-C does
    try:
        main()
    except UserError as exc:
        print(f"{name}: error: {exc}" + (undo_hint(str(exc)) if isinstance(exc, ConfigError) else ""), file=sys.stderr)
        sys.exit(1)
    except Exception as exc:  # a full disk, a permission, a missing path: the environment's, not a bug here
        cause = os_cause(exc)
        if cause is None:
            raise  # a bug: its traceback is what finds it
        print(f"{name}: error: {os_error(cause)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; nothing partial was written (training resumes from its last epoch when rerun)",
              file=sys.stderr)
        sys.exit(130)


def undo_hint(error: str) -> str:
    """For a refused value that an earlier `dvc exp run -S` left in the workspace's params.yaml (DVC
    applies an experiment's params there, so every later run fails the same way): the way back.
    The leftovers the error names, else all of them; "" when params.yaml is as committed."""
    from vitcnn.overrides import leftover_text, leftovers

    try:
        changed = leftovers()
    except OSError:  # no git: nothing to compare with
        return ""
    if not changed:
        return ""
    named = {k: v for k, v in changed.items() if k in error}
    return f"; params.yaml now holds {leftover_text(named or changed)} — git checkout params.yaml to undo"


def os_cause(exc: BaseException) -> OSError | None:
    """The OS error behind `exc`, if any: an OSError it is or was raised from; else one a library
    reported in words (safetensors: "... (os error 28)"), under the project; else, when the disk
    under the project is full now, that (torch.save says only "unexpected pos 576 vs 534" when a
    write falls short)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    folder = str(Path.cwd())  # the project: outputs are written under it
    reported = OS_ERROR_TEXT.search(str(exc))
    if reported:
        code = int(reported.group(1))
        return OSError(code, os.strerror(code), folder)
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free < FULL_BYTES:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), folder)
    return None


def os_error(exc: OSError) -> str:
    """An OSError as one line: what the OS said, the file, and what to do."""
    what = first_line(RuntimeError(exc.strerror)) if exc.strerror else first_line(exc)
    files = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    advice = OS_ADVICE.get(exc.errno or 0, "")
    return what + (f": {files}" if files else "") + (f"; {advice}" if advice else "")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt

"""`python -m vitcnn.study.supervise CMD ...`: run CMD, and stop it when the process that started
this one dies.

A Dask worker that is killed mid-run (out of memory, a lost node, `kill -9`) cannot stop the
`dvc exp run` it started, and Dask then runs the task again on another worker: the orphan would
train on beside the rerun, taking its CPU or GPU. So the worker starts the run through this
supervisor, which puts CMD in a process group of its own and, once its parent is gone (it is
adopted by another process), ends that whole group: DVC and the stage it runs. SIGTERM and
SIGINT sent to the supervisor go to the group too. It exits with CMD's status (128 + the signal
when a signal ended CMD).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5
GRACE_S = 10.0  # after SIGTERM, before SIGKILL: a stage stops with one line within it


def supervise(cmd: list[str]) -> int:
    parent = os.getppid()
    child = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum: int, frame) -> None:
        _end(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while child.poll() is None:
        if os.getppid() != parent:  # the worker died: nobody will push this run, and Dask reruns it
            _end(child, signal.SIGTERM)
            break
        time.sleep(POLL_S)
    code = child.wait()
    return 128 - code if code < 0 else code


def _end(child: subprocess.Popen, signum: int) -> None:
    """Signal CMD's whole process group; SIGKILL it if it is still there after GRACE_S."""
    try:
        os.killpg(child.pid, signum)
        child.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    sys.exit(supervise(sys.argv[1:]))

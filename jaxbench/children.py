"""The suite's subprocesses: every run and the probe is a child, so JAX state never leaks from
one run into the next and the suite itself never holds a device.

A child dies with the suite (a kill -9 of the suite never leaves a run writing into the folder
that the rerun resumes), a Ctrl-C reaches it exactly once, and it inherits the folder's lock, so
no second suite starts while one of them lives.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from jaxbench.suite import SuiteError

ENV_PARENT = "JAXBENCH_REPRODUCE_PARENT"  # the suite's pid: a child started after it died exits
LOCK = ".reproduce.lock"


def die_with_parent() -> None:
    """In a child: die with the suite (Linux: PR_SET_PDEATHSIG), so a kill -9 of the suite never
    leaves a run writing into the folder that the rerun resumes."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    parent = os.environ.get(ENV_PARENT)
    if parent and os.getppid() != int(parent):
        os._exit(137)  # the suite died before prctl took effect


def child_run() -> None:
    """Entry of each run subprocess: `python -m jaxbench.run` with the arguments given, dying
    with the suite."""
    die_with_parent()
    from jaxbench import run

    sys.exit(run.main(sys.argv[1:]))


class Children:
    """Starts children in their own process group (a terminal's Ctrl-C reaches the suite only,
    which forwards exactly one SIGINT per Ctrl-C: the run saves a checkpoint and exits 130), with
    the suite's lock inherited so no second suite can start while one of them lives."""

    def __init__(self, lock_fd: int | None):
        self.lock_fd = lock_fd
        self.interrupted = False

    def run(self, argv: list[str], env: dict | None = None) -> int:
        kwargs: dict[str, Any] = {"process_group": 0} if os.name == "posix" else {}
        if self.lock_fd is not None:
            kwargs["pass_fds"] = (self.lock_fd,)
        proc = subprocess.Popen(argv, env={**os.environ, ENV_PARENT: str(os.getpid()),
                                           **(env or {})}, **kwargs)

        def forward(signum, frame):
            self.interrupted = True
            try:
                proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass

        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while True:
                try:
                    return proc.wait()
                except KeyboardInterrupt:  # pragma: no cover - the handler above takes SIGINT
                    forward(signal.SIGINT, None)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def python_c(module: str, function: str) -> list[str]:
    """The command line of a child whose entry is `module.function()` (it reads sys.argv)."""
    return [sys.executable, "-c", f"from {module} import {function}; {function}()"]


def acquire_lock(out: Path, wait_s: float = 20.0) -> int | None:
    """An exclusive lock on the folder (None where fcntl does not exist). A killed suite's run may
    take a moment to die (it holds the lock too): wait for it, then give up with SuiteError."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    path = out / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            if time.monotonic() > deadline:
                holder = path.read_text().strip() or "?"
                os.close(fd)
                raise SuiteError(f"another `python -m jaxbench.reproduce` (pid {holder}), or a run "
                                 f"it started, is still using {out}. Wait for it to end or stop "
                                 "it; two suites never share a folder.") from None
            time.sleep(0.2)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd

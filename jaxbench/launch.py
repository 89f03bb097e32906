"""Run `python -m jaxbench.run` as N processes on this machine, as on N hosts:
`python -m jaxbench.launch --nproc 2 -- --exp fmnist_baseline ...`.

Each process gets its own CPU device(s) (`--devices-per-process`) and the `--distributed`
flags; they meet at a coordinator on a free local port and train one data-parallel program whose
all-reduces go through gloo, exactly as processes on several hosts would over a network. Their
output is forwarded line by line, prefixed with `[p0] `, `[p1] `, ...

When a process fails (an error, a signal, `kill -9`), the launcher names it, kills the others
and exits non-zero: no orphan processes and no coordinator left waiting. It kills with SIGKILL
at once: JAX's distributed runtime catches SIGTERM (a preemption notice) and trains on. The
processes also die with the launcher (Linux PR_SET_PDEATHSIG). Checkpoints are written to a
temporary folder and renamed when complete, so killing never leaves a torn one; the message says
how to `--resume`.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Sequence

EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130
RESERVED = ("--distributed", "--coordinator", "--num-processes", "--process-id")


def positive_int(text: str) -> int:
    from jaxbench.cli import positive_int as parse

    return parse(text)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False, prog="python -m jaxbench.launch",
        usage="python -m jaxbench.launch [--nproc N] [options] -- RUN_ARGS",
        description="Start `python -m jaxbench.run RUN_ARGS --distributed ...` as N processes on "
        "this machine's CPU; forward their output; stop them all when one fails.")
    p.add_argument("--nproc", type=positive_int, default=2, help="processes (default 2)")
    p.add_argument("--devices-per-process", type=positive_int, default=1,
                   help="CPU devices each process sees (default 1)")
    p.add_argument("--port", type=port_number, help="the coordinator's port (default: a free one)")
    p.add_argument("--exit-timeout", type=positive_float, default=120.0,
                   help="once one process has finished, seconds the others get to finish too "
                   "(default 120)")
    p.add_argument("--timeout", type=positive_float,
                   help="stop every process after this many seconds (default: no limit)")
    return p


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def child_env(devices: int) -> dict[str, str]:
    # Their output is a pipe: progress bars (tfds' preparation) would print every redraw.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    return env


try:  # looked up before any fork: the child only calls it
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: the launcher's own cleanup still applies
    _prctl = None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _prctl is not None:
        _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: SIGKILL when the launcher dies


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def exit_code(code: int) -> int:
    return 128 - code if code < 0 else code


class Launcher:
    """The N processes, their output forwarding, and stopping them."""

    def __init__(self, run_args: list[str], nproc: int, devices: int, port: int):
        self.run_args, self.nproc = run_args, nproc
        self.coordinator = f"127.0.0.1:{port}"
        self.env = child_env(devices)
        self.procs: list[subprocess.Popen] = []
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.ended: dict[int, float] = {}  # process index -> when its exit was seen

    def command(self, i: int) -> list[str]:
        return [sys.executable, "-m", "jaxbench.run", *self.run_args, "--distributed",
                "--coordinator", self.coordinator, "--num-processes", str(self.nproc),
                "--process-id", str(i)]

    def say(self, message: str) -> None:
        with self.lock:
            sys.stderr.buffer.write(f"[launch] {message}\n".encode())
            sys.stderr.flush()

    def start(self) -> None:
        # Fork every process before any forwarding thread exists (preexec_fn and threads mix badly).
        for i in range(self.nproc):
            self.procs.append(subprocess.Popen(
                self.command(i), env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_die_with_parent))
        for i, proc in enumerate(self.procs):
            self.say(f"process {i}: pid {proc.pid}")
            for pipe, sink in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                t = threading.Thread(target=self._forward, args=(pipe, sink, f"[p{i}] "),
                                     daemon=True)
                t.start()
                self.threads.append(t)

    def _forward(self, pipe: IO[bytes], sink: IO[str], prefix: str) -> None:
        head = prefix.encode()
        for line in iter(pipe.readline, b""):
            if not line.endswith(b"\n"):
                line += b"\n"
            with self.lock:
                sink.buffer.write(head + line)
                sink.flush()
        pipe.close()

    def poll(self) -> list[int | None]:
        codes = [p.poll() for p in self.procs]
        now = time.monotonic()
        for i, code in enumerate(codes):
            if code is not None:
                self.ended.setdefault(i, now)
        return codes

    def stop(self, reason: str) -> None:
        """SIGKILL to every process still running (SIGTERM would be taken as a preemption
        notice by JAX and ignored), and reap them."""
        running = [i for i, p in enumerate(self.procs) if p.poll() is None]
        if running:
            self.say(f"{reason}; killing process(es) {', '.join(map(str, running))}")
        for i in running:
            _signal(self.procs[i], signal.SIGKILL)
        for i in running:
            self.procs[i].wait()

    def drain(self) -> None:
        for t in self.threads:
            t.join(timeout=5)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    """Signal the process's whole group (started with start_new_session, it leads its own process group), so helpers go too."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def resume_hint(argv: Sequence[str], run_args: list[str]) -> str:
    launcher_args, _ = split_argv(argv)
    args = [a for a in run_args if a not in ("--resume", "--restart")]
    return shlex.join(["python", "-m", "jaxbench.launch", *launcher_args, "--", *args, "--resume"])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, run_args = split_argv(argv)
    args = parser().parse_args(own)
    if not run_args:
        print("error: nothing to run: give jaxbench.run's arguments after --, e.g. "
              "python -m jaxbench.launch --nproc 2 -- --exp fmnist_baseline", file=sys.stderr)
        return EXIT_USAGE
    reserved = [a for a in run_args if a.split("=")[0] in RESERVED]
    if reserved:
        print(f"error: {', '.join(reserved)}: the launcher sets the --distributed flags itself; "
              "drop them from the arguments after --.", file=sys.stderr)
        return EXIT_USAGE
    launcher = Launcher(run_args, args.nproc, args.devices_per_process,
                        args.port or free_port())
    interrupted: list[int] = []

    def on_signal(signum, frame):
        interrupted.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    first = shlex.join(["python", *launcher.command(0)[1:]])
    launcher.say(f"{args.nproc} processes x {args.devices_per_process} CPU device(s), coordinator "
                 f"{launcher.coordinator}: {first} (process 0)")
    try:
        return supervise(launcher, args, argv, run_args, interrupted)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def supervise(launcher: Launcher, args, argv, run_args, interrupted: list[int]) -> int:
    start = time.monotonic()
    launcher.start()
    hint = ("Checkpoints of finished epochs are kept (the newest one if its asynchronous write "
            f"had completed): continue with {resume_hint(argv, run_args)}")
    while True:
        codes = launcher.poll()
        now = time.monotonic()
        failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            # The first to end; among those seen at once, one killed by a signal (the cause;
            # the others' errors are usually its consequence), else the lowest index.
            first = min(failed, key=lambda i: (launcher.ended[i], codes[i] >= 0, i))
            what = f"process {first} (pid {launcher.procs[first].pid}) {describe(codes[first])}"
            launcher.stop(what)
            launcher.drain()
            # Exit 2 is a usage error (a bad flag, missing data): nothing trained, no resume.
            launcher.say(f"failed: {what}." + ("" if codes[first] == EXIT_USAGE else f" {hint}"))
            return exit_code(codes[first])
        if all(c == 0 for c in codes):
            launcher.drain()
            launcher.say(f"all {len(codes)} processes finished")
            return 0
        done = [launcher.ended[i] for i, c in enumerate(codes) if c == 0]
        if done and now - min(done) > args.exit_timeout:
            lost = [i for i, c in enumerate(codes) if c is None]
            what = (f"process(es) {', '.join(map(str, lost))} still running {args.exit_timeout:g}s "
                    "after another finished (hung?)")
            launcher.stop(what)
            launcher.drain()
            launcher.say(f"failed: {what}")
            return 1
        if args.timeout is not None and now - start > args.timeout:
            launcher.stop(f"--timeout {args.timeout:g}s reached")
            launcher.drain()
            launcher.say(f"failed: --timeout {args.timeout:g}s reached. {hint}")
            return EXIT_TIMEOUT
        if interrupted:
            name = signal.Signals(interrupted[0]).name
            launcher.stop(f"{name} received")
            launcher.drain()
            launcher.say(f"interrupted ({name}). {hint}")
            return EXIT_INTERRUPTED
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())

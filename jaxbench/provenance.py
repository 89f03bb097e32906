"""Provenance of a suite folder: when it ran, from which commit (and whether the checkout was
dirty), and the notes a reader of its report must see.

Written by the suite process, which does not import JAX: hence its own atomic JSON writer
rather than `jaxbench.outputs.write_json`, whose module imports JAX.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def git_state() -> dict:
    """The checkout's commit and whether tracked files differ from it (None outside a checkout)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def provenance_notes(prov: dict) -> list[str]:
    """What a reader of the report must know: a suite run over several commits, or dirty."""
    invocations = prov.get("invocations", [])
    commits = list(dict.fromkeys(s.get("commit") for s in invocations if s.get("commit")))
    notes = []
    if len(commits) > 1:
        notes.append("this suite ran in several invocations at different commits ("
                     + ", ".join(c[:7] for c in commits) + "); see provenance.json")
    if any(s.get("dirty") for s in invocations):
        notes.append("at least one invocation ran from a checkout with uncommitted changes "
                     "(provenance.json: dirty)")
    devices = list(dict.fromkeys(json.dumps(s["device"], sort_keys=True) for s in invocations
                                 if s.get("device")))
    if len(devices) > 1:
        notes.append("this suite's invocations ran on different devices; see provenance.json")
    return notes

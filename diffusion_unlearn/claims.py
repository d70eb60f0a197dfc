"""Claim a unit of work (a study cell) exactly once, however many processes, jobs or machines share its folder.

A claim is `claim.json` created with O_CREAT | O_EXCL (atomic on local file systems and NFS): the one process
that creates it runs the unit; the others skip it. A claim records who made it (host, pid, SLURM job id); it is
stale, and may be taken over, when its process is gone: on the same host, when the pid no longer runs; under
SLURM, when it is older than the job's time limit (`stale_after`). A finished unit has its result file and
its claim is released. See docs/cluster.md.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

CLAIM_FILE = "claim.json"


def owner() -> dict:
    """Who is claiming: host, pid, SLURM job id (when any), a unique token and the time."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "token": uuid.uuid4().hex, "time": time.time()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(claim: dict, stale_after: float | None = None) -> bool:
    """A claim whose process is gone: same host and the pid no longer runs, or older than `stale_after` s."""
    if claim.get("host") == socket.gethostname() and not _alive(int(claim.get("pid", -1))):
        return True
    return stale_after is not None and time.time() - float(claim.get("time", 0)) > stale_after


def read_claim(folder: Path) -> dict | None:
    try:
        return json.loads((folder / CLAIM_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None  # none, or one being written this instant (its maker holds it)


def try_claim(folder: str | Path, stale_after: float | None = None) -> dict | None:
    """Our claim on `folder` (the caller runs the unit), or None when a live process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CLAIM_FILE
    me = owner()
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = read_claim(folder)
            if held is None or not is_stale(held, stale_after) or not _remove_stale(folder, held["token"]):
                return None
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return me
    return None


def _remove_stale(folder: Path, token: str) -> bool:
    """Remove the stale claim `token`, under a takeover lock (an atomic mkdir) so that of two takers only one
    removes it and neither removes a fresh claim made meanwhile."""
    lock = folder / ".takeover.lock"
    try:
        lock.mkdir()
    except FileExistsError:
        return False
    try:
        held = read_claim(folder)
        if held is None or held.get("token") != token:
            return False
        (folder / CLAIM_FILE).unlink(missing_ok=True)
        return True
    finally:
        lock.rmdir()


def release(folder: str | Path, claim: dict) -> None:
    """Drop our claim (a claim someone took over as stale stays theirs)."""
    held = read_claim(Path(folder))
    if held is not None and held.get("token") == claim["token"]:
        (Path(folder) / CLAIM_FILE).unlink(missing_ok=True)

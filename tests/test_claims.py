"""Claims: each unit of work runs once, however many processes race for it; a dead owner's claim is taken over."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys

from diffusion_unlearn.claims import CLAIM_FILE, is_stale, read_claim, release, try_claim


def _race(folder: str, n: int, queue) -> None:
    won = [i for i in range(n) if try_claim(os.path.join(folder, f"cell-{i}")) is not None]
    queue.put(won)


def test_racing_processes_claim_each_unit_once(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), 40, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    won = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    flat = sorted(i for w in won for i in w)
    assert flat == list(range(40))  # every unit claimed, none twice


def test_a_dead_owners_claim_is_taken_over_and_a_live_one_is_not(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = tmp_path / "cell"
    folder.mkdir()
    (folder / CLAIM_FILE).write_text(json.dumps({"host": __import__("socket").gethostname(),
                                                 "pid": int(dead.stdout), "token": "old", "time": 0}))
    assert is_stale(read_claim(folder))
    mine = try_claim(folder)
    assert mine is not None and read_claim(folder)["token"] == mine["token"]
    assert try_claim(folder) is None  # we are alive: nobody else gets it
    assert try_claim(folder, stale_after=-1) is not None  # ... unless older than a time limit (SLURM)
    release(folder, mine)  # no longer ours: taken over above, so it stays
    assert read_claim(folder) is not None


def test_release_frees_the_unit(tmp_path):
    mine = try_claim(tmp_path / "c")
    release(tmp_path / "c", mine)
    assert read_claim(tmp_path / "c") is None and try_claim(tmp_path / "c") is not None

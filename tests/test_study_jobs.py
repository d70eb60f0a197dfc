"""Study cells across processes and jobs: claimed work runs once (a dead owner's is taken over), two concurrent
`study` processes sharing one --out split the cells and write the one-process table, the submitit local
executor runs the cells in its jobs, and SLURM cells get the asked-for sbatch settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import diffusion_unlearn
from diffusion_unlearn.claims import CLAIM_FILE, read_claim, try_claim
from diffusion_unlearn.cli import main
from diffusion_unlearn.config import StudyConfig, build_config
from diffusion_unlearn.study import Work, plan_cells, run_claimed, slurm_parameters, wait_for

PACKAGE_ROOT = str(Path(diffusion_unlearn.__file__).resolve().parents[1])  # the package these tests import
TINY_SFRON = {"method": "sfron", "iterations": 2, "batch_size": 8, "fisher_batch_size": 64, "fisher_max_batches": 1}
CELLS = ["sfron-dual-c0-s0", "sfron-dual-c1-s0", "sfron-shared-c0-s0", "sfron-shared-c1-s0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    """The tiny model, a one-epoch classifier, a tiny SFRon preset and the study arguments (4 cells)."""
    root = tmp_path_factory.mktemp("jobs")
    classifier = root / "classifier"
    assert main(["train-classifier", "--dataset", "digits", "--out", str(classifier), "--epochs", "1"]) == 0
    (root / "tiny-sfron.yaml").write_text(yaml.safe_dump(TINY_SFRON))
    args = ["study", "--model", str(tiny_model), "--classifier", str(classifier), "--preset-prefix",
            f"{root}/tiny-", "--cache-dir", str(root / "fid-cache"), "--methods", "sfron", "--classes", "0,1",
            "--steps", "2", "--fa-samples", "4", "--retain-samples-per-class", "2", "--curve-every", "2",
            "--curve-fa-samples", "2", "--curve-retain-per-class", "2"]
    return root, args


@pytest.fixture(scope="module")
def one_process_table(setup):
    root, args = setup
    assert main([*args, "--out", str(root / "one")]) == 0
    return (root / "one" / "table.md").read_text()


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": PACKAGE_ROOT, "OMP_NUM_THREADS": "1"}


def _runs(out: Path) -> dict[str, list[dict]]:
    """Each cell's runs.jsonl: one line per run of the cell."""
    return {cell: [json.loads(line) for line in (out / "cells" / cell / "runs.jsonl").read_text().splitlines()]
            for cell in CELLS}


# ----------------------------------------------------------------------------- claimed work


def test_claimed_work_runs_once_and_a_dead_owners_claim_is_taken_over(tmp_path):
    made = []

    def unit(name: str) -> Work:
        return Work(tmp_path / name, (tmp_path / name / "done").exists,
                    lambda: (made.append(name), (tmp_path / name / "done").write_text("")))

    assert run_claimed(unit("a"), None) and not run_claimed(unit("a"), None)  # done: not made again
    assert read_claim(tmp_path / "a") is None  # released after making
    held = try_claim(tmp_path / "b")
    assert not run_claimed(unit("b"), None)  # a live process (this one) holds it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "b" / CLAIM_FILE).write_text(json.dumps({**held, "pid": int(dead.stdout)}))  # its owner died
    wait_for([unit("a"), unit("b"), unit("c")], None)  # b: stale, taken over; c: unclaimed, no job left to take it
    assert made == ["a", "b", "c"]


def test_a_failed_unit_is_released_for_the_next_process(tmp_path):
    def fail():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_claimed(Work(tmp_path / "x", lambda: False, fail), None)
    assert read_claim(tmp_path / "x") is None


def test_slurm_cells_get_the_asked_for_sbatch_settings(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    from submitit.slurm.slurm import SlurmExecutor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # as if srun were present
    cfg = build_config(StudyConfig, {"executor": "slurm", "partition": "gpu", "gpus_per_cell": 4,
                                     "time_limit": 90, "array_parallelism": 3, "cpus_per_cell": 16})
    executor = submitit.AutoExecutor(tmp_path, cluster="slurm")
    executor.update_parameters(**slurm_parameters(cfg))
    executor._executor.parameters["map_count"] = 10  # as map_array sets it for an array of 10 cells
    sbatch = executor._executor._make_submission_file_text("python -m job", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=4", "#SBATCH --time=90",
                 "#SBATCH --cpus-per-task=16", "#SBATCH --ntasks-per-node=1", "#SBATCH --array=0-9%3"):
        assert line in sbatch


def test_the_cluster_settings_do_not_change_what_a_cell_computes():
    from diffusion_unlearn.study import Cell, cell_record

    cell = Cell("sfron", "dual", 0, 0)
    inline = build_config(StudyConfig, {"model": "m", "out": "o"})
    slurm = build_config(StudyConfig, {"model": "m", "out": "o", "executor": "slurm", "partition": "p",
                                       "gpus_per_cell": 8, "time_limit": 5, "array_parallelism": 2})
    assert cell_record(inline, cell) == cell_record(slurm, cell)  # a study moved to the cluster reuses its cells
    assert [c.name for c in plan_cells(build_config(StudyConfig, {"methods": "sfron", "classes": "0,1"}), 10)] \
        == ["sfron-dual-c0-s0", "sfron-shared-c0-s0", "sfron-dual-c1-s0", "sfron-shared-c1-s0"]


def test_slurm_without_slurm_and_jobs_with_slurm_fail_in_one_line(setup, tmp_path, capsys):
    _, args = setup
    assert main([*args, "--out", str(tmp_path / "s"), "--executor", "slurm", "--jobs", "2"]) == 2
    assert "--array-parallelism" in capsys.readouterr().err
    if subprocess.run(["which", "srun"], capture_output=True).returncode != 0:
        assert main([*args, "--out", str(tmp_path / "s"), "--executor", "slurm"]) == 2
        assert "--executor local" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_two_concurrent_studies_share_the_cells_exactly_once(setup, one_process_table):
    root, args = setup
    out = root / "shared-out"
    procs = [subprocess.Popen([sys.executable, "-m", "diffusion_unlearn", *args, "--out", str(out)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
    runs = _runs(out)
    assert all(len(r) == 1 for r in runs.values()), runs  # every cell ran, none twice
    assert {r[0]["pid"] for r in runs.values()} <= {p.pid for p in procs}
    assert all(json.loads(stdout)["cells"] == len(CELLS) for stdout, _ in outputs)  # both wrote the table ...
    assert (out / "table.md").read_text() == one_process_table  # ... the one of a single process
    assert not list(out.glob("cells/*/claim.json")) and not list(out.glob("shared/.claims/*/claim.json"))


@pytest.mark.slow
def test_local_executor_runs_the_cells_in_two_jobs(setup, one_process_table, monkeypatch):
    root, args = setup
    out = root / "local-out"
    for key, value in _env().items():
        monkeypatch.setenv(key, value)  # the jobs import this package, one thread each
    assert main([*args, "--out", str(out), "--executor", "local", "--jobs", "2"]) == 0
    runs = _runs(out)
    assert all(len(r) == 1 for r in runs.values()), runs
    assert os.getpid() not in {r[0]["pid"] for r in runs.values()}  # made by the jobs, not the study process
    assert list((out / "jobs").glob("*_log.out"))  # submitit's job logs
    assert (out / "table.md").read_text() == one_process_table

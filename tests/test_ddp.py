"""`forget` and `pretrain` on 2 processes (DDP over gloo on the CPU) give the 1-process result, and a run killed
under one process count resumes under the other to the uninterrupted result.

The weights are compared within 1e-5 under SGD with momentum: the per-sample draws are the same, but a
2-process gradient is a sum of two half-batch gradients, equal to the 1-process one only to float rounding, and
Adam turns the pure round-off gradient of weights whose true gradient is zero (the tiny U-Net's per-channel biases
before a 32-group GroupNorm of 32 channels) into steps of ±lr. Under the default AdamW the logged losses (the
draws, the global-batch means and SFRon's global weights) are compared instead.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from builders import ema_update_that_kills
from diffusion_unlearn.cli import main

pytestmark = pytest.mark.slow  # each 2-process launch imports the stack twice (~20 s on 2 cores)

ROOT = Path(__file__).resolve().parents[1]
SGD = ["--forget-optim", "sgd", "--retain-optim", "sgd", "--forget-lr", "1e-3", "--retain-lr", "1e-3"]


def _forget_args(model, out, *extra):
    return ["forget", "--model", str(model), "--dataset", "digits", "--forget-class", "3", "--iterations", "4",
            "--batch-size", "16", "--fisher-batch-size", "64", "--fisher-max-batches", "2", "--grid-per-class", "1",
            "--steps", "2", "--checkpoint-every", "1", "--device", "cpu", "--out", str(out), *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(args, kill_after: int = 0) -> int:
    """`args` through the CLI under `accelerate launch --multi_gpu --num_processes 2` on the CPU (gloo); its exit
    status. With `kill_after`, every process is killed after that many EMA updates (tests/ddp_launch.py)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(ROOT / "tests" / "ddp_launch.py"), str(kill_after), *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if kill_after == 0 and done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-6000:])
    return done.returncode


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def _max_difference(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _killed_forget(monkeypatch, args, kill_after: int) -> None:
    """`forget` in this process, killed after `kill_after` EMA updates; a state is left behind."""
    from diffusion_unlearn.ema import EMA

    killing, original = ema_update_that_kills(kill_after)
    monkeypatch.setattr(EMA, "update", killing)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.setattr(EMA, "update", original)


@pytest.fixture(scope="module")
def one_process_sgd(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    assert main(_forget_args(tiny_model, out, *SGD)) == 0
    return out


def test_forget_on_two_processes_equals_one(tiny_model, one_process_sgd, tmp_path):
    two = tmp_path / "two"
    assert _two_processes(_forget_args(tiny_model, two, *SGD)) == 0
    assert _max_difference(one_process_sgd / "model", two / "model") < 1e-5
    assert [r["iteration"] for r in _log(two)] == [0, 1, 2, 3]


def test_forget_losses_under_adamw_match_across_process_counts(tiny_model, tmp_path):
    """SFRon's adaptive weights are normalised over the global batch and every draw is keyed: the losses the
    two runs log are the same numbers (first iteration: the same weights, so equal to float rounding)."""
    assert main(_forget_args(tiny_model, tmp_path / "one", "--iterations", "2")) == 0
    assert _two_processes(_forget_args(tiny_model, tmp_path / "two", "--iterations", "2")) == 0
    for a, b in zip(_log(tmp_path / "one"), _log(tmp_path / "two"), strict=True):
        for key in ("forget_loss", "retain_loss", "forget_grad_norm", "retain_grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key


def test_forget_killed_under_two_processes_resumes_under_one(tiny_model, one_process_sgd, tmp_path):
    out = tmp_path / "run"
    args = _forget_args(tiny_model, out, *SGD)
    assert _two_processes(args, kill_after=3) != 0  # killed in iteration 2, state.pt after 2 iterations
    assert (out / "state.pt").exists() and not (out / "model").exists()
    assert main(args) == 0
    assert _max_difference(one_process_sgd / "model", out / "model") < 1e-5
    assert [r["iteration"] for r in _log(out)] == [0, 1, 2, 3]


def test_forget_killed_under_one_process_resumes_under_two(tiny_model, one_process_sgd, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = _forget_args(tiny_model, out, *SGD)
    _killed_forget(monkeypatch, args, kill_after=2)  # state.pt after 1 iteration
    assert (out / "state.pt").exists()
    assert _two_processes(args) == 0
    assert _max_difference(one_process_sgd / "model", out / "model") < 1e-5


PRETRAIN = ["--model-preset", "tiny", "--iterations", "6", "--checkpoint-every", "2", "--batch-size", "16",
            "--optimizer", "sgd", "--lr", "1e-3", "--device", "cpu"]


def test_pretrain_on_two_processes_equals_one_and_resumes_across(tmp_path, monkeypatch):
    assert main(["pretrain", "--out", str(tmp_path / "one"), *PRETRAIN]) == 0
    assert _two_processes(["pretrain", "--out", tmp_path / "two", *PRETRAIN]) == 0
    assert _max_difference(tmp_path / "one", tmp_path / "two") < 1e-5
    killed = ["pretrain", "--out", str(tmp_path / "killed"), *PRETRAIN]
    assert _two_processes(killed, kill_after=5) != 0  # state after 4 iterations
    assert (tmp_path / "killed" / "training_state.pt").exists()
    assert main(killed) == 0
    assert _max_difference(tmp_path / "one", tmp_path / "killed") < 1e-5

"""`mask` on N processes: the Fisher / saliency batches split over the processes give the one-process mask, bit for
bit, because every batch draws from its own seed and the sums are made in batch order (saliency.py docstring)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_unlearn.cli import main
from diffusion_unlearn.data import load_dataset
from diffusion_unlearn.modelfolder import load_model_folder
from diffusion_unlearn.pipelines.backbone import DDPMBackbone
from diffusion_unlearn.saliency import fisher_diagonal, mask_density, mask_metadata

ROOT = Path(__file__).resolve().parents[1]  # the checkout whose package the launched processes import
# 3 batches of the forget set: process 0 computes batches 0 and 2, process 1 batch 1 (an uneven last round)
MASK_ARGS = ["--forget-class", "3", "--fisher-batch-size", "16", "--fisher-max-batches", "3", "--seed", "5",
             "--device", "cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_mask(model: Path, out: Path, kind: str, extra: list[str]) -> None:
    """`accelerate launch --multi_gpu --num_processes 2 -m diffusion_unlearn mask ...` on the CPU (gloo), one
    thread per process, importing this checkout."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           "-m", "diffusion_unlearn", "mask", "--model", str(model), "--out", str(out), "--kind", kind,
           *MASK_ARGS, *extra]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("kind, extra", [("fisher-ratio", ["--gamma", "1.5"]), ("topk", ["--topk-fraction", "0.3"])])
def test_two_processes_make_the_one_process_mask(tiny_model, tmp_path, kind, extra):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    assert main(["mask", "--model", str(tiny_model), "--out", str(one), "--kind", kind, *MASK_ARGS, *extra]) == 0
    _launch_mask(tiny_model, two, kind, extra)
    a, b = load_file(str(one)), load_file(str(two))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    density = mask_density({k: v != 0 for k, v in a.items()})
    assert 0.01 < density < 0.99  # a mask that selects, so that equality says something
    assert mask_metadata(one)["num_processes"] == 1 and mask_metadata(two)["num_processes"] == 2


def test_batch_draws_are_seeded_per_batch_and_leave_the_global_rng_alone(tiny_model):
    """Each batch's timesteps and noise come from (seed, batch index), never from the global RNG's position."""
    backbone = DDPMBackbone(load_model_folder(tiny_model).denoiser)
    data = load_dataset("digits").with_classes([3])
    kw = dict(batch_size=16, max_batches=2, seed=7)
    torch.manual_seed(0)
    first = fisher_diagonal(backbone, data, **kw)
    after = torch.get_rng_state()
    torch.manual_seed(1)
    second = fisher_diagonal(backbone, data, **kw)
    torch.manual_seed(0)
    assert torch.equal(after, torch.get_rng_state())  # the global RNG is restored
    assert all(torch.equal(first[k], second[k]) for k in first)
    other_seed = fisher_diagonal(backbone, data, **{**kw, "seed": 8})
    assert not all(torch.equal(first[k], other_seed[k]) for k in first)


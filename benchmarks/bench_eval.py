"""Throughput of `eval` on the sample store: sampled images/s and extracted features/s with 1 and 2 processes on
the CPU (the tiny lineage U-Net and a digits classifier trained here for a few epochs), one JSON line per setting
and a last line with the 1→2 scaling; with `--device cuda`, also images/s of the CIFAR-10 U-Net at the paper
protocol (DDIM form, η = 1, 1000 steps, s = 3, fp32) and of DiT-XL/2's 250-step sampler (random weights).

Each setting is a fresh `eval` (fresh store) run as the user runs it: `python -m diffusion_unlearn eval` for one
process, `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m diffusion_unlearn eval` for two;
the numbers are the metrics JSON's `store_throughput` (images made / wall time of the store fill, and images /
feature-extraction seconds of the slowest process).

    OMP_NUM_THREADS=1 python benchmarks/bench_eval.py                  # CPU, 1 and 2 processes
    python benchmarks/bench_eval.py --device cuda --cuda-images 64     # plus the GPU samplers
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_setting(processes: int, work: Path, args) -> dict:
    """One `eval` with `processes` processes on a fresh store; its store throughput."""
    out = work / f"p{processes}" / "metrics.json"
    cmd = ["-m", "diffusion_unlearn", "eval", "--model", str(work / "tiny"), "--classifier", str(work / "clf"),
           "--out", str(out), "--cache-dir", str(work / "cache"), "--forget-class", "3", "--fa-samples",
           str(args.fa_samples), "--retain-samples-per-class", str(args.per_class), "--sampler", "ddim", "--steps",
           str(args.steps), "--shard-size", str(args.shard_size), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    launcher = ([sys.executable] if processes == 1 else
                [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
                 str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", str(_free_port())])
    subprocess.run([*launcher, *cmd], env=env, check=True, capture_output=True)
    metrics = json.loads(out.read_text())
    t = metrics["store_throughput"]
    return {"setting": f"cpu, {processes} process(es)", "num_processes": metrics["num_processes"],
            "images": t["images_made"], "seconds": round(t["seconds"], 2),
            "images_per_s": round(t["images_per_second"], 2), "features_per_s": round(t["features_per_second"], 1),
            "steps": args.steps, "shard_size": args.shard_size}


def prepare(work: Path) -> None:
    """The tiny model folder and a digits classifier (2 epochs: throughput does not depend on its accuracy)."""
    from diffusion_unlearn.eval.classifier import ClassifierConfig, train_classifier
    from diffusion_unlearn.modelfolder import ModelMeta, save_model_folder
    from diffusion_unlearn.models.unet_lineage import ClassConditionalUNet

    torch.manual_seed(0)
    save_model_folder(work / "tiny", ClassConditionalUNet.from_preset("tiny"),
                      ModelMeta(class_names=[str(i) for i in range(10)], dataset="digits"))
    train_classifier(ClassifierConfig(out=str(work / "clf"), epochs=2, seed=0, device="cpu"))


def cuda_unet(images: int) -> dict:
    """Images/s of the CIFAR-10 U-Net (random weights) at the paper protocol."""
    from diffusion_unlearn.models.unet_lineage import ClassConditionalUNet
    from diffusion_unlearn.modelfolder import ModelMeta, load_model_folder, save_model_folder

    with tempfile.TemporaryDirectory() as tmp:
        save_model_folder(Path(tmp) / "unet", ClassConditionalUNet.from_preset("cifar10"),
                          ModelMeta(class_names=[str(i) for i in range(10)], dataset="cifar10"))
        pipe = load_model_folder(Path(tmp) / "unet", "cuda").pipeline
        labels = torch.arange(images) % 10
        kw = dict(guidance_scale=3.0, sampler="ddim", eta=1.0, seed=0, batch_size=images, precision="fp32",
                  progress=False)
        pipe(labels[:2], num_inference_steps=2, indices=[0, 1], **kw)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        pipe(labels, num_inference_steps=1000, indices=list(range(images)), **kw)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {"setting": "cuda, CIFAR-10 U-Net, paper protocol (ddim η=1, 1000 steps, s=3, fp32)", "images": images,
            "seconds": round(seconds, 2), "images_per_s": round(images / seconds, 3)}


def cuda_dit(images: int) -> dict:
    """Images/s of DiT-XL/2's 250-step sampler (random weights; bench_dit_xl2.measure_sampler)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_dit_xl2 import measure_sampler

    out = measure_sampler(SimpleNamespace(device="cuda", size="DiT-XL/2", sample_images=images, sample_steps=250))
    return {"setting": "cuda, DiT-XL/2, " + out.pop("sampler"), **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--fa-samples", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--cuda-images", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work)
        one, two = cpu_setting(1, work, args), cpu_setting(2, work, args)
        for line in (one, two, {"scaling_1_to_2": {"images_per_s": round(two["images_per_s"] / one["images_per_s"], 3),
                                                   "features_per_s": round(two["features_per_s"]
                                                                           / one["features_per_s"], 3)}}):
            print(json.dumps(line), flush=True)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA GPU here")
        print(json.dumps(cuda_unet(args.cuda_images)), flush=True)
        print(json.dumps(cuda_dit(args.cuda_images)), flush=True)


if __name__ == "__main__":
    main()

"""Guided DDIM sampling speed of the lineage U-Net (`ClassConditionalPipeline`), the yardstick's `sample` work:
the CIFAR-10 U-Net (38.6 M, random weights), batch 16, 5 steps, s = 3, cond + null in one batched forward.
Variants of the pipeline run interleaved in one process (A, B, C, A, B, C, ...) so that a busy machine slows
them alike; the JSON line gives each variant's median images/s and their ratios to `plain`.

    python benchmarks/bench_sampler.py                               # CPU, 2 threads, plain vs channels-last
    python benchmarks/bench_sampler.py --compile --repeats 5         # also torch.compile (first call excluded)
    python benchmarks/bench_sampler.py --device cuda --batch-size 256 --steps 50 --compile

Variants: `plain` (contiguous NCHW input), `channels_last` (the default), `compile` (channels-last +
torch.compile). Compare with the published code: `python $YARDSTICK/side_by_side.py ref sample 16 5`.

Roofline: the line also gives the U-Net's FLOPs per image-step (torch's FLOP counter on one guided forward: the
conditional and the null pass), the same process's fp32 matrix-multiply rate (`gemm_gflops`, a 2048² matmul), the
fastest variant's achieved rate and `bound_images_per_s`, the images/s of a sampler whose every FLOP ran at that
matmul rate. A sampler doing the same math (same network, same steps, fp32) cannot beat that bound; the achieved
fraction says how much room is left on this device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusion_unlearn.config import resolve_device
from diffusion_unlearn.models.factory import build_unet
from diffusion_unlearn.pipelines.pipeline_class_conditional import ClassConditionalPipeline, training_scheduler

VARIANTS = {"plain": dict(channels_last=False), "channels_last": dict(channels_last=True),
            "compile": dict(channels_last=True, compile=True)}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gemm_gflops(device: str, size: int = 2048, repeats: int = 10) -> float:
    """fp32 matrix-multiply GFLOP/s of this device (median of `repeats` size² products)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    times = []
    for _ in range(repeats + 2):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times[2:]) / 1e9


def flops_per_image_step(unet: torch.nn.Module, batch: int, image_size: int, channels: int, device: str) -> float:
    """FLOPs of one guided denoising step per image: the U-Net forward on the conditional and the null pass."""
    x = torch.randn(2 * batch, channels, image_size, image_size, device=device)  # (2B, C, H, W)
    t = torch.full((2 * batch,), 500, device=device)
    y = torch.arange(2 * batch, device=device) % 10
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, t, y)
    return counter.get_total_flops() / batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cifar10")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="add the torch.compile variant")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    unet = build_unet("lineage-unet", args.preset, channels=3 if args.preset == "cifar10" else 1,
                      image_size=32 if args.preset == "cifar10" else 8, num_classes=10).to(device)
    pipe = ClassConditionalPipeline(unet=unet, scheduler=training_scheduler())
    labels = torch.arange(args.batch_size) % 10
    names = [n for n in VARIANTS if n != "compile" or args.compile]
    kw = dict(num_inference_steps=args.steps, guidance_scale=3.0, batch_size=args.batch_size, progress=False)
    for name in names:  # warm-up (and compilation) outside the timings
        pipe(labels, **{**kw, "num_inference_steps": 1}, **VARIANTS[name])
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for name in names:
            sync(device)
            start = time.perf_counter()
            pipe(labels, **kw, **VARIANTS[name])
            sync(device)
            times[name].append(time.perf_counter() - start)
    speed = {n: args.batch_size / statistics.median(ts) for n, ts in times.items()}
    cifar = args.preset == "cifar10"
    flops = flops_per_image_step(unet, args.batch_size, 32 if cifar else 8, 3 if cifar else 1, device)
    peak = gemm_gflops(device)
    achieved = max(speed.values()) * args.steps * flops / 1e9  # GFLOP/s of the fastest variant
    result = {"benchmark": "sampler", "device": device, "threads": torch.get_num_threads(), "preset": args.preset,
              "batch_size": args.batch_size, "steps": args.steps, "repeats": args.repeats,
              "load_average": [round(x, 2) for x in os.getloadavg()],
              **{f"{n}_images_per_s": round(v, 3) for n, v in speed.items()},
              **{f"{n}_over_plain": round(v / speed["plain"], 3) for n, v in speed.items() if n != "plain"},
              "gflop_per_image_step": round(flops / 1e9, 2), "gemm_gflops": round(peak, 1),
              "achieved_gflops": round(achieved, 1), "fraction_of_gemm": round(achieved / peak, 3),
              "bound_images_per_s": round(peak * 1e9 / (args.steps * flops), 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Time one SFRon unlearning iteration (forget + retain step) with dual vs shared optimizers, and the guided
sampler, on a randomly initialised model. Prints one JSON line.

    python benchmarks/bench_step.py                              # digits preset, batch 128, CPU
    python benchmarks/bench_step.py --preset cifar10 --channels 3 --image-size 32 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from diffusion_unlearn.config import ForgetConfig, resolve_device
from diffusion_unlearn.data import ImageDataset
from diffusion_unlearn.models.factory import build_unet
from diffusion_unlearn.pipelines.backbone import DDPMBackbone
from diffusion_unlearn.pipelines.pipeline_class_conditional import ClassConditionalPipeline, training_scheduler
from diffusion_unlearn.saliency import GradientMask
from diffusion_unlearn.unlearn import Unlearner


def synthetic_dataset(n: int, channels: int, size: int, num_classes: int) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    return ImageDataset(name="synthetic", split="train", root=None, class_names=[str(i) for i in range(num_classes)],
                        channels=channels, image_size=size, transform_id="synthetic",
                        targets=torch.arange(n) % num_classes,
                        pixels=torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_iterations(optim: str, args, device: str) -> float:
    from accelerate import Accelerator

    torch.manual_seed(0)
    unet = build_unet(args.backbone, args.preset, channels=args.channels, image_size=args.image_size,
                      num_classes=10).to(device)
    data = synthetic_dataset(4 * args.batch_size, args.channels, args.image_size, 10)
    forget_set, retain_set = data.with_classes([0]), data.with_classes(list(range(1, 10)))
    mask = {n: torch.rand(p.shape, device=device) > 0.5 for n, p in unet.named_parameters()}
    cfg = ForgetConfig(batch_size=args.batch_size, optim=optim, iterations=args.iterations + args.warmup)
    acc = Accelerator(cpu=device == "cpu")
    learner = Unlearner(cfg, DDPMBackbone(unet), forget_set, retain_set, GradientMask(unet, mask), acc)
    for _ in range(args.warmup):
        learner.run_iteration(None)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.iterations):
        learner.run_iteration(None)
    sync(device)
    return (time.perf_counter() - start) / args.iterations


def time_sampler(args, device: str) -> float:
    torch.manual_seed(0)
    unet = build_unet(args.backbone, args.preset, channels=args.channels, image_size=args.image_size,
                      num_classes=10).to(device)
    pipe = ClassConditionalPipeline(unet=unet, scheduler=training_scheduler())
    labels = torch.arange(args.sample_images) % 10
    pipe(labels[:2], num_inference_steps=2, progress=False)  # warm-up
    sync(device)
    start = time.perf_counter()
    pipe(labels, num_inference_steps=args.sample_steps, guidance_scale=3.0, batch_size=args.sample_images,
         progress=False)
    sync(device)
    return args.sample_images / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="lineage-unet")
    p.add_argument("--preset", default="digits")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--image-size", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sample-images", type=int, default=500)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    result = {"benchmark": "sfron_iteration", "device": device, "threads": torch.get_num_threads(),
              "backbone": args.backbone, "preset": args.preset, "batch_size": args.batch_size,
              "image": [args.channels, args.image_size, args.image_size]}
    for optim in ("dual", "shared"):
        result[f"{optim}_s_per_iteration"] = round(time_iterations(optim, args, device), 4)
    result["dual_over_shared"] = round(result["dual_s_per_iteration"] / result["shared_s_per_iteration"], 3)
    result["sampler_images_per_s"] = round(time_sampler(args, device), 2)
    result["sampler"] = f"ddim {args.sample_steps} steps, guidance s=3 (cond+null batched)"
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if device.startswith("cuda"):
        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

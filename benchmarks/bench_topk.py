"""Peak memory and time of SalUn's top-k mask (saliency.topk_mask, no global sort) against the reference's global
sort, on random scores shaped like a model's parameters (default: the lineage U-Net `cifar10` preset, 38.6 M).
Each measurement runs in a fresh process and reports its peak RSS growth over the scores (resource.ru_maxrss).
Prints one JSON line.

    python benchmarks/bench_topk.py                       # cifar10 preset, top 50 %
    python benchmarks/bench_topk.py --preset digits --fraction 0.1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from diffusion_unlearn.models.unet_lineage import ClassConditionalUNet
from diffusion_unlearn.saliency import Mask, topk_mask, topk_threshold

MB = 2**20


def make_scores(preset: str, seed: int) -> Mask:
    """Uniform float32 scores of every parameter's shape (the model itself is built on the meta device, so only
    the scores take memory). 2^24 distinct values over tens of millions of entries: many ties."""
    with torch.device("meta"):
        unet = ClassConditionalUNet.from_preset(preset)
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) for n, p in unet.named_parameters()}


def exact_topk(scores: Mask, fraction: float) -> Mask:
    """The reference's way: one global (stable) descending sort of every score."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])  # (N,)
    keep = torch.zeros(len(flat), dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[:int(fraction * len(flat))]] = True
    return dict(zip(scores, (k.view(s.shape) for k, s in zip(keep.split([s.numel() for s in scores.values()]),
                                                               scores.values()))))


def measure(part: str, args) -> dict:
    """Run one part on fresh scores; its seconds and peak RSS growth (MB) over the scores. A first run on the tiny
    preset's scores keeps torch's one-time set-up (kernels, thread pools: ~11 MB) out of the measurement."""
    warm = make_scores("tiny", args.seed)
    topk_mask(warm, args.fraction), exact_topk(warm, args.fraction)
    scores = make_scores(args.preset, args.seed)
    n = sum(s.numel() for s in scores.values())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    start = time.perf_counter()
    if part == "threshold":
        topk_threshold(scores, int(args.fraction * n))
    elif part == "mask":
        topk_mask(scores, args.fraction)
    else:
        exact = exact_topk(scores, args.fraction)
    seconds = time.perf_counter() - start
    out = {"part": part, "parameters": n, "seconds": round(seconds, 3),
           "peak_rss_growth_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, 2)}
    if part == "exact":
        ours = topk_mask(scores, args.fraction)
        out["equal"] = all(torch.equal(ours[k], exact[k]) for k in scores)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cifar10")
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--part", choices=["threshold", "mask", "exact"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.part:
        print(json.dumps(measure(args.part, args)))
        return
    common = [f"--preset={args.preset}", f"--fraction={args.fraction}", f"--seed={args.seed}"]
    parts = {part: json.loads(subprocess.run([sys.executable, __file__, f"--part={part}", *common], check=True,
                                             capture_output=True, text=True).stdout.splitlines()[-1])
             for part in ("threshold", "mask", "exact")}
    n = parts["mask"]["parameters"]
    output_mb = n / MB  # the bool mask itself, one byte per parameter
    print(json.dumps({
        "benchmark": "salun_topk_mask", "model": f"lineage-unet {args.preset}", "parameters": n,
        "fraction": args.fraction, "k": int(args.fraction * n), "threads": torch.get_num_threads(),
        "scores_mb": round(4 * n / MB, 2), "params_over_100_float32_mb": round(4 * n / 100 / MB, 2),
        "threshold_s": parts["threshold"]["seconds"], "threshold_peak_extra_mb": parts["threshold"]["peak_rss_growth_mb"],
        "mask_s": parts["mask"]["seconds"], "mask_output_mb": round(output_mb, 2),
        "mask_peak_extra_beyond_output_mb": round(parts["mask"]["peak_rss_growth_mb"] - output_mb, 2),
        "exact_sort_s": parts["exact"]["seconds"], "exact_sort_peak_extra_mb": parts["exact"]["peak_rss_growth_mb"],
        "equal_to_exact_sort": parts["exact"]["equal"],
    }))


if __name__ == "__main__":
    main()

"""Wall time and peak memory of one full-size DiT-XL/2 SFRon iteration (one forget step + one retain step), with
DualOptim (`dual`: separate forget and retain AdamW states) against one shared AdamW (`shared`).

What runs: `ClassConditionalDiT` at the DiT-XL/2 size (1000 classes + null row, 32x32x4 latents, learned sigma:
674,834,720 parameters) with random weights (the zero-initialised adaLN and output layers filled with N(0, 0.02)
too, so every gradient is non-zero), behind `LatentDiTBackbone` with no VAE weights: the data are VAE posterior
moments (B, 8, 32, 32), which the adapter samples and scales itself (it only reads the VAE's `scaling_factor`,
given here by a stub). The loop is the library's own `Unlearner.run_iteration` with the settings of the preset
`dit-xl2-imagenet-sfron-dual` (batch 1, AdamW lr 5e-5 on both sides, plain GA forget loss with label dropout,
cosine α over 500 iterations, mask then clip 1.0 on the forget step, unclipped retain step, EMA 0.9999), only
`--optim` changed; the forget gradient goes through the same `GradientMask` as in `forget`, from a random
Bernoulli mask of `--mask-density` (`--mask fisher`: the real SFRon Fisher-ratio path on `--fisher-draws`
batches per set; `--mask none`: no mask). Memory and time do not depend on the density (the mask and the
multiply are dense).

Every setup runs in a FRESH subprocess, one at a time: a warm-up iteration, then `--iterations` timed ones. Per
setup: parameters, seconds per iteration (split into forget step, retain step and EMA update; the two optimizer steps
alone as `forget_optimizer_s` / `retain_optimizer_s`: the part dual and shared differ in), peak RSS (ru_maxrss,
decimal GB) and the RSS after each stage, the load average before and after; then the dual/shared ratios.
`--compare-stock` repeats it with diffusers' stock `DiTTransformer2DModel` at the XL/2 configuration our export
writes (per-block embedder copies: 749,826,464 parameters), through the same loop (`--models stock`: stock alone).
`--no-ema` drops the EMA copy (one fp32 copy of the weights) to match a bare training step. A setup whose estimated
peak exceeds the memory available now is skipped (`--force` runs it anyway). AdamW is per-tensor on CPU (torch's
default there; the JSON records it). On CUDA it also reports the peak GPU memory and the paper-faithful sampler's
images/s (`ClassConditionalDiTPipeline`, `ddpm`, 250 steps, s = 1.5, cond + null batched, random SD-VAE decode).

    python benchmarks/bench_dit_xl2.py --out runs/bench-dit-xl2.json                 # ours, dual and shared, CPU
    python benchmarks/bench_dit_xl2.py --threads 2 --compare-stock --no-ema --out runs/bench-dit-xl2-noema.json
    python benchmarks/bench_dit_xl2.py --device cuda --iterations 5 --out runs/bench-dit-xl2-cuda.json

Measured on the 2-core, 24 GiB CPU machine (2 threads, shared with other jobs: load average 4–5), peak RSS in
decimal GB. With `--no-ema --mask none`: ours shared 13.0–13.2, dual 18.3–18.8; stock shared 14.3–14.5, dual
20.4–20.5 (ours/stock 0.89–0.93, dual/shared 1.42–1.43 for both). The full loop (EMA, random mask): ours shared
16.6 (19.7 before GradientMask kept its factors bool); dual ~22 GB did not fit beside the other jobs. Seconds
per iteration varied 38–95 s with the load (ours 54–90, stock 80–95): compare only runs taken together.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from diffusion_unlearn.models.dit_transformer import DIT_SIZES, ClassConditionalDiT, dit_num_params

PRESET = "dit-xl2-imagenet-sfron-dual"
SIZE = "DiT-XL/2"
FORGET_CLASS = 207  # the reference's first snapshot class (golden retriever)
SD_VAE_SCALING = 0.18215
GB = 1e9
MARGIN_GB = 0.5  # a CPU setup runs only if its estimated peak plus this fits in the memory available now


# ----------------------------------------------------------------------------- measuring


def rss_gb() -> float:
    """The current resident set size (VmRSS) in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / GB
    return float("nan")


def peak_rss_gb() -> float:
    """The peak resident set size so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GB
    return float("inf")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- the setups


def stock_params(name: str) -> int:
    """Stock diffusers' count: ours plus (depth − 1) copies of the timestep and label embedders."""
    size = DIT_SIZES[name]
    d = size["hidden_size"]
    embedders = (256 * d + d) + (d * d + d) + 1001 * d
    return dit_num_params(**size) + (size["depth"] - 1) * embedders


def estimate_peak_gb(name: str, model: str, optim: str, ema: bool, mask: bool) -> float:
    """fp32 weights, gradients, Adam's two moments per optimizer, the EMA copy, a bool mask, and ~2.6 GB of the rest
    (measured on XL/2: 0.9 GB of imports, 1.3–1.6 GB of activations and allocator slack at batch 1)."""
    n = dit_num_params(**DIT_SIZES[name]) if model == "ours" else stock_params(name)
    copies = 1 + 1 + 2 * (2 if optim == "dual" else 1) + int(ema)
    return (4 * copies + int(mask)) * n / GB + 2.6


class StockDiT(torch.nn.Module):
    """Stock `DiTTransformer2DModel` with the three config fields `LatentDiTBackbone` reads. It is called as
    `model(x, t, labels)` and returns `.sample`, as ours; in train mode it also drops labels in every block."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = SimpleNamespace(num_classes=1000, in_channels=4, sample_size=32, learn_sigma=True)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor):
        return self.model(x, t, labels)


def build_model(kind: str, name: str = SIZE) -> torch.nn.Module:
    """DiT-XL/2 (or `name`), 1000 classes, 32x32x4 latents, learned sigma, random weights (nothing left at zero)."""
    torch.manual_seed(0)
    if kind == "ours":
        model = ClassConditionalDiT.from_size(name, sample_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    else:
        from diffusers import DiTTransformer2DModel

        from diffusion_unlearn.models.convert_dit import diffusers_config

        with torch.device("meta"):  # only for its config: what our export writes
            ref = ClassConditionalDiT.from_size(name, sample_size=32, in_channels=4, num_classes=1000)
        model = StockDiT(DiTTransformer2DModel(**diffusers_config(ref)))
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return model


def latent_dataset(n: int, forget_class: int):
    """`n` items of (8, 32, 32) "pixels" that ImageDataset maps to [−1, 1]: the mean and log variance of a
    4-channel VAE posterior, as cached latents would be; a quarter of them labelled `forget_class`."""
    from diffusion_unlearn.data import ImageDataset

    g = torch.Generator().manual_seed(0)
    others = torch.randint(0, 999, (n,), generator=g)
    targets = torch.where(torch.arange(n) % 4 == 0, forget_class, others + (others >= forget_class).long())
    return ImageDataset(name="latents", split="train", root=None, class_names=[str(i) for i in range(1000)],
                        channels=8, image_size=32, transform_id="synthetic-moments", targets=targets,
                        pixels=torch.randint(0, 256, (n, 8, 32, 32), generator=g, dtype=torch.uint8))


def preset_config(**overrides):
    from diffusion_unlearn.config import ForgetConfig, build_config, preset_path, yaml_values

    return build_config(ForgetConfig, yaml_values(ForgetConfig, preset_path(PRESET)), overrides)


def make_mask(args, backbone, forget_set, retain_set, cfg):
    from diffusion_unlearn.saliency import compute_mask

    if args.mask == "none":
        return None
    if args.mask == "fisher":
        settings = dataclasses.replace(cfg.mask, fisher_max_batches=args.fisher_draws)
        return compute_mask(backbone, forget_set, retain_set, settings, "fisher-ratio", cfg.seed)
    g = torch.Generator().manual_seed(1)  # drawn straight into bool: no float temporaries left in the heap
    return {n: torch.empty(p.shape, dtype=torch.bool).bernoulli_(args.mask_density, generator=g).to(p.device)
            for n, p in backbone.named_parameters().items()}


class NoEMA:
    """Stands in for the loop's EMA under `--no-ema` (built in its place, so no copy is ever allocated)."""

    def __init__(self, model: torch.nn.Module, rate: float):
        pass

    def update(self) -> None:
        pass


def optimizer_kernel(optimizer: torch.optim.Optimizer) -> str:
    """How torch will run this optimizer's step: fused, foreach or per-tensor."""
    from torch.optim.optimizer import _default_to_fused_or_foreach

    d = optimizer.defaults
    if d.get("fused"):
        return "fused"
    if d.get("foreach") is None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return "foreach" if _default_to_fused_or_foreach(params, False, False)[1] else "per-tensor"
    return "foreach" if d["foreach"] else "per-tensor"


def measure(args) -> dict:
    """One setup, in this (fresh) process."""
    from accelerate import Accelerator

    import diffusion_unlearn.unlearn
    from diffusion_unlearn.pipelines.latent_backbone import LatentDiTBackbone
    from diffusion_unlearn.saliency import GradientMask, mask_density
    from diffusion_unlearn.unlearn import Unlearner

    if args.no_ema:
        diffusion_unlearn.unlearn.EMA = NoEMA  # in this worker process only

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    stages = {"imports": rss_gb()}
    start = time.perf_counter()
    model = build_model(args.worker, args.size).to(device)
    build_s = time.perf_counter() - start
    stages["model"] = rss_gb()
    cfg = preset_config(optim=args.optim, device=device)
    vae = SimpleNamespace(config=SimpleNamespace(scaling_factor=SD_VAE_SCALING))  # moments need only the scale
    backbone = LatentDiTBackbone(model, vae)
    data = latent_dataset(16, FORGET_CLASS)
    forget_set = data.with_classes([FORGET_CLASS])
    retain_set = data.with_classes([c for c in range(1000) if c != FORGET_CLASS])
    mask = make_mask(args, backbone, forget_set, retain_set, cfg)
    stages["mask"] = rss_gb()
    accelerator = Accelerator(cpu=device == "cpu")
    learner = Unlearner(cfg, backbone, forget_set, retain_set,
                        GradientMask(model, mask) if mask is not None else None, accelerator)
    stages["loop_ready"] = rss_gb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    peak_before_loop = peak_rss_gb()

    step_s = {"forget": 0.0, "retain": 0.0}  # the optimizer steps alone (within the forget / retain phases)

    def timed_step(side: str, step):
        def run() -> None:
            sync(device)
            begin = time.perf_counter()
            step()
            sync(device)
            step_s[side] += time.perf_counter() - begin
        return run

    learner.optim.forget_step = timed_step("forget", learner.optim.forget_step)
    learner.optim.retain_step = timed_step("retain", learner.optim.retain_step)
    iterations = []
    for i in range(args.warmup + args.iterations):
        marks: dict[str, float] = {}
        step_s.update(forget=0.0, retain=0.0)

        def mark(k: int, phase: str) -> None:
            sync(device)
            marks[phase] = time.perf_counter()
            marks[phase + "_peak_rss_gb"] = peak_rss_gb()

        sync(device)
        t0 = time.perf_counter()
        record = learner.run_iteration(mark)
        sync(device)
        t1 = time.perf_counter()
        iterations.append({"warmup": i < args.warmup, "seconds": t1 - t0, "forget_s": marks["forget"] - t0,
                           "retain_s": marks["retain"] - marks["forget"], "ema_s": t1 - marks["retain"],
                           "forget_optimizer_s": step_s["forget"], "retain_optimizer_s": step_s["retain"],
                           "peak_rss_gb_after_forget": marks["forget_peak_rss_gb"],
                           "peak_rss_gb_after_retain": marks["retain_peak_rss_gb"], "rss_gb_end": rss_gb(),
                           "forget_loss": record.get("forget_loss"), "retain_loss": record.get("retain_loss")})
        print(f"  [{args.worker} {args.optim}] iteration {i}{' (warm-up)' if i < args.warmup else ''}: "
              f"{t1 - t0:.2f} s, peak RSS {peak_rss_gb():.2f} GB", file=sys.stderr, flush=True)
    timed = [it for it in iterations if not it["warmup"]]
    mean = lambda key: sum(it[key] for it in timed) / len(timed)  # noqa: E731
    result = {
        "model": args.worker, "optim": args.optim, "device": device, "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer_kernel": optimizer_kernel(learner.optim.retain_optimizer),
        "ema": not args.no_ema, "mask": args.mask,
        "mask_density": None if mask is None else round(mask_density(mask), 4),
        "build_s": round(build_s, 2),
        "s_per_iteration": round(mean("seconds"), 3), "forget_step_s": round(mean("forget_s"), 3),
        "retain_step_s": round(mean("retain_s"), 3), "ema_s": round(mean("ema_s"), 3),
        "forget_optimizer_s": round(mean("forget_optimizer_s"), 3),
        "retain_optimizer_s": round(mean("retain_optimizer_s"), 3),
        "peak_rss_gb": round(peak_rss_gb(), 3), "peak_rss_gb_before_loop": round(peak_before_loop, 3),
        "rss_gb_after": {k: round(v, 3) for k, v in stages.items()},
        "iterations": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in it.items()} for it in iterations],
    }
    if device.startswith("cuda"):
        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / GB, 3)
        result["peak_gpu_reserved_gb"] = round(torch.cuda.max_memory_reserved() / GB, 3)
    return result


def measure_sampler(args) -> dict:
    """Images/s of the paper-faithful sampler (ddpm, 250 steps, s = 1.5) on a random XL/2 and a random SD VAE."""
    from diffusers import AutoencoderKL

    from diffusion_unlearn.pipelines.pipeline_dit import ClassConditionalDiTPipeline, dit_training_scheduler

    device = args.device
    model = build_model("ours", args.size).to(device).eval()
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=256, scaling_factor=SD_VAE_SCALING).to(device).eval()
    pipe = ClassConditionalDiTPipeline(transformer=model, vae=vae, scheduler=dit_training_scheduler())
    labels = torch.arange(args.sample_images) % 1000
    kw = dict(sampler="ddpm", guidance_scale=1.5, batch_size=args.sample_images, progress=False,
              precision="bf16" if device.startswith("cuda") else "fp32")
    pipe(labels[:2], num_inference_steps=2, **kw)  # warm-up
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    pipe(labels, num_inference_steps=args.sample_steps, **kw)
    sync(device)
    seconds = time.perf_counter() - start
    result = {"sampler": f"ddpm {args.sample_steps} steps, s=1.5 (cond+null batched), bf16 autocast on CUDA, "
                         "VAE decode", "images": args.sample_images, "seconds": round(seconds, 2),
              "images_per_s": round(args.sample_images / seconds, 3)}
    if device.startswith("cuda"):
        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / GB, 3)
    return result


# ----------------------------------------------------------------------------- the driver


def run_worker(kind: str, optim: str, args) -> dict:
    """Run one setup in a fresh interpreter; its result comes back through a temporary JSON file."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", kind, "--optim", optim, "--device", args.device,
               "--iterations", str(args.iterations), "--warmup", str(args.warmup), "--threads", str(args.threads),
               "--mask", args.mask, "--mask-density", str(args.mask_density), "--fisher-draws",
               str(args.fisher_draws), "--sample-images", str(args.sample_images),
               "--sample-steps", str(args.sample_steps), "--size", args.size, "--result", str(result_file)]
        if args.no_ema:
            cmd.append("--no-ema")
        load_before = os.getloadavg()
        start = time.perf_counter()
        proc = subprocess.run(cmd)
        wall = time.perf_counter() - start
        load_after = os.getloadavg()
        if proc.returncode != 0 or not result_file.exists():
            result = {"model": kind, "optim": optim, "error": f"exit status {proc.returncode}"
                      + (" (killed: out of memory?)" if proc.returncode == -9 else "")}
        else:
            result = json.loads(result_file.read_text())
    result["process_wall_s"] = round(wall, 1)
    result["load_avg_before"] = [round(x, 2) for x in load_before]
    result["load_avg_after"] = [round(x, 2) for x in load_after]
    return result


def ratio(a: dict, b: dict, key: str) -> float | None:
    if key in a and key in b and b[key]:
        return round(a[key] / b[key], 3)
    return None


def print_table(runs: list[dict]) -> None:
    head = f"{'setup':<13} {'params':>13} {'s/iter':>7} {'forget':>7} {'retain':>7} {'EMA':>6} {'peak RSS GB':>12}" \
           f" {'peak GPU GB':>12}  load avg (1/5/15 min) before -> after"
    print(head)
    print("-" * len(head))
    for r in runs:
        name = f"{r['model']} {r['optim']}"
        load = f"{'/'.join(f'{x:.2f}' for x in r['load_avg_before'])} -> " \
               f"{'/'.join(f'{x:.2f}' for x in r['load_avg_after'])}" if "load_avg_before" in r else ""
        if "error" in r or "skipped" in r:
            print(f"{name:<13} {r.get('error') or r.get('skipped')}  {load}")
            continue
        gpu = f"{r['peak_gpu_gb']:.2f}" if "peak_gpu_gb" in r else "-"
        print(f"{name:<13} {r['params']:>13,} {r['s_per_iteration']:>7.2f} {r['forget_step_s']:>7.2f} "
              f"{r['retain_step_s']:>7.2f} {r['ema_s']:>6.2f} {r['peak_rss_gb']:>12.2f} {gpu:>12}  {load}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optim", default="dual,shared", help="comma-separated: dual, shared")
    p.add_argument("--iterations", type=int, default=2, help="timed iterations (after the warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--compare-stock", action="store_true",
                   help="also run diffusers' stock DiTTransformer2DModel XL/2 through the same loop")
    p.add_argument("--models", default="ours", help="comma-separated: ours, stock (--compare-stock adds stock)")
    p.add_argument("--no-ema", action="store_true", help="leave out the loop's EMA copy of the weights")
    p.add_argument("--mask", default="random", choices=["random", "fisher", "none"])
    p.add_argument("--mask-density", type=float, default=0.3, help="share of weights the random mask lets move")
    p.add_argument("--fisher-draws", type=int, default=2, help="--mask fisher: batches per set")
    p.add_argument("--sample-images", type=int, default=32, help="CUDA: images the sampler is timed on")
    p.add_argument("--sample-steps", type=int, default=250)
    p.add_argument("--size", default=SIZE, choices=list(DIT_SIZES), help="a smaller size for a quick check")
    p.add_argument("--force", action="store_true", help="run setups that may not fit in the available memory")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--worker", choices=["ours", "stock", "sampler"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")

    if args.worker:
        result = measure_sampler(args) if args.worker == "sampler" else measure(args)
        Path(args.result).write_text(json.dumps(result))
        return

    optims = [o.strip() for o in args.optim.split(",") if o.strip()]
    if any(o not in ("dual", "shared") for o in optims):
        sys.exit(f"--optim: choose from dual, shared (got {args.optim})")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    models += ["stock"] if args.compare_stock and "stock" not in models else []
    if not models or any(m not in ("ours", "stock") for m in models):
        sys.exit(f"--models: choose from ours, stock (got {args.models})")
    runs = []
    for kind in models:
        for optim in optims:
            need, free = estimate_peak_gb(args.size, kind, optim, not args.no_ema, args.mask != "none"), available_gb()
            if args.device == "cpu" and need + MARGIN_GB > free and not args.force:
                runs.append({"model": kind, "optim": optim, "skipped": f"needs ~{need:.1f} GB, "
                             f"{free:.1f} GB available (--force runs it)", "estimated_peak_gb": round(need, 1)})
                print(f"skip {kind} {optim}: {runs[-1]['skipped']}", file=sys.stderr)
                continue
            print(f"running {kind} {optim} (estimated peak ~{need:.1f} GB, {free:.1f} GB available)", file=sys.stderr,
                  flush=True)
            runs.append({**run_worker(kind, optim, args), "estimated_peak_gb": round(need, 1)})
    sampler = run_worker("sampler", "-", args) if args.device == "cuda" else None

    ok = {(r["model"], r["optim"]): r for r in runs if "params" in r}
    ratios = {}
    for kind in ("ours", "stock"):
        if (kind, "dual") in ok and (kind, "shared") in ok:
            dual, shared = ok[kind, "dual"], ok[kind, "shared"]
            ratios[f"{kind}_dual_over_shared"] = {k: ratio(dual, shared, k) for k in
                                                  ("s_per_iteration", "forget_optimizer_s", "peak_rss_gb",
                                                   "peak_gpu_gb") if k in dual}
            # the same, from the optimizer steps alone: the forward and backward passes are the same work in both
            # setups, so their run-to-run noise (~±0.5 s of ~11 s on the 2-core CPU) cancels here
            ratios[f"{kind}_dual_over_shared"]["s_per_iteration_from_steps"] = round(
                1 + (dual["forget_optimizer_s"] + dual["retain_optimizer_s"] - shared["forget_optimizer_s"]
                     - shared["retain_optimizer_s"]) / shared["s_per_iteration"], 3)
            ratios[f"{kind}_dual_over_shared"]["extra_peak_rss_gb"] = round(dual["peak_rss_gb"]
                                                                             - shared["peak_rss_gb"], 3)
    for optim in optims:
        if ("ours", optim) in ok and ("stock", optim) in ok:
            ours, stock = ok["ours", optim], ok["stock", optim]
            ratios[f"ours_over_stock_{optim}"] = {k: ratio(ours, stock, k) for k in
                                                  ("params", "s_per_iteration", "peak_rss_gb", "peak_gpu_gb")
                                                  if k in ours}
    result = {"benchmark": "dit_xl2_sfron_iteration", "preset": PRESET, "size": args.size, "batch_size": 1,
              "latents": [4, 32, 32], "device": args.device, "iterations": args.iterations, "warmup": args.warmup,
              "ema": not args.no_ema, "mask": args.mask, "mask_density": args.mask_density,
              "torch": torch.__version__, "cpu_count": os.cpu_count(), "runs": runs, "ratios": ratios}
    if sampler is not None:
        result["sampler"] = sampler

    print()
    print(f"{args.size} SFRon iteration (batch 1, preset {PRESET}), {args.device}, "
          f"{'no EMA' if args.no_ema else 'with EMA'}, mask {args.mask}; mean of {args.iterations} after "
          f"{args.warmup} warm-up; seconds and decimal GB")
    print_table(runs)
    for name, values in ratios.items():
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in values.items()))
    if sampler is not None:
        print(f"sampler: {sampler.get('images_per_s')} images/s ({sampler.get('sampler')}), "
              f"peak GPU {sampler.get('peak_gpu_gb')} GB")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Guided sampling of a pixel-space class-conditional DDPM as a diffusers `DiffusionPipeline`."""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline
from tqdm.auto import tqdm

from diffusion_unlearn.diffusion import NUM_TRAIN_TIMESTEPS, linear_betas
from diffusion_unlearn.fileio import UserError
# diffusers only loads a custom component class whose module is already imported: import ours here so
# `ClassConditionalPipeline.from_pretrained(folder)` works in a fresh process.
from diffusion_unlearn.models import unet_lineage  # noqa: F401
from diffusion_unlearn.pipelines.guidance import guided_output
from diffusion_unlearn.seeds import image_generators


Precision = Literal["fp32", "bf16"]  # the denoiser's precision while sampling (`--sampling-precision`)


def bf16_autocast(precision: str, device: torch.device | str) -> bool:
    """Whether sampling on `device` runs the denoiser under bf16 autocast. `bf16` is refused off CUDA: CPU
    sampling stays float32 (bf16 there is slow and never what a published run used)."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"sampling precision {precision!r} is unresolved; fill it with resolve_sampler(...) first")
    if precision == "bf16" and torch.device(device).type != "cuda":
        raise UserError(f"--sampling-precision bf16 needs a CUDA device, not {device}; "
                        "use --sampling-precision fp32 (or auto)")
    return precision == "bf16"


def training_scheduler() -> DDPMScheduler:
    """The training process as a diffusers scheduler: the reference's float64→float32 linear betas
    (passed as `trained_betas`, since diffusers builds its linspace in float32) and no x̂0 clipping."""
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, trained_betas=linear_betas().tolist(),
                         clip_sample=False, prediction_type="epsilon", variance_type="fixed_small")


def sampling_scheduler(config, sampler: str):
    """DDIM (η from the call) or ancestral DDPM, both with `clip_sample=False`: `from_config` would inherit
    `clip_sample=True` from stock DDPM configs, which ruins guided samples."""
    if sampler == "ddim":
        return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=True,
                                         timestep_spacing="leading")
    if sampler == "ddpm":
        return DDPMScheduler.from_config(config, clip_sample=False, variance_type="fixed_small")
    raise ValueError(f"unknown sampler {sampler!r}")


def unet_num_classes(unet: torch.nn.Module) -> int:
    """K, the number of real classes; the null class is index K for every backbone."""
    cfg = unet.config
    if getattr(cfg, "num_classes", None) is not None:
        return int(cfg.num_classes)
    return int(cfg.num_class_embeds) - 1  # diffusers UNet2DModel: K + 1 embeddings, the last one null


def unet_sample_shape(unet: torch.nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of the images a U-Net denoises (lineage `image_size` or diffusers `sample_size`)."""
    cfg = unet.config
    size = getattr(cfg, "image_size", None) or cfg.sample_size
    return (int(cfg.in_channels), int(size), int(size))


def predict_eps(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    out = unet(x, t, class_labels=labels)
    return out.sample if hasattr(out, "sample") else out


def guided_eps(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, scale: float,
               null_class: int) -> torch.Tensor:
    """ε̃ = ε_u + s(ε_c − ε_u) of a U-Net (s = 1 + w; `guided_output`)."""
    return guided_output(lambda xs, ts, ys: predict_eps(unet, xs, ts, ys), x, t, labels, scale, null_class)


class ClassConditionalPipeline(DiffusionPipeline):
    """Class-conditional DDPM sampling with classifier-free guidance (DDIM with η, or ancestral DDPM)."""

    def __init__(self, unet: torch.nn.Module, scheduler: DDPMScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self._compiled: tuple[torch.nn.Module, torch.nn.Module] | None = None  # (unet, torch.compile(unet))

    def unet_to_run(self, compile: bool) -> torch.nn.Module:
        """The U-Net, or its `torch.compile`d form (compiled once per U-Net and kept for later calls)."""
        if not compile:
            return self.unet
        if self._compiled is None or self._compiled[0] is not self.unet:
            self._compiled = (self.unet, torch.compile(self.unet))
        return self._compiled[1]

    @torch.no_grad()
    def __call__(self, class_labels: Sequence[int] | torch.Tensor, *, guidance_scale: float = 3.0,
                 num_inference_steps: int = 50, sampler: str = "ddim", eta: float = 0.0, seed: int = 0,
                 indices: Sequence[int] | None = None, batch_size: int = 500, precision: Precision = "fp32",
                 progress: bool = True, channels_last: bool = True, compile: bool = False) -> torch.Tensor:
        """Images in [-1, 1], (N, C, H, W) on the CPU. Image n uses the generator of `indices[n]`.
        `precision` "bf16": the U-Net under bf16 autocast (CUDA only), the scheduler steps in float32.
        `channels_last`: the U-Net's input in channels-last layout (the convolutions then skip their layout
        reorders; same values within float rounding). `compile`: the U-Net through `torch.compile` (slow first
        call; kept for later calls of this pipeline)."""
        labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()  # (N,)
        indices = list(range(len(labels))) if indices is None else list(indices)
        unet = self.unet
        denoiser = self.unet_to_run(compile)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        device = unet.device
        bf16 = bf16_autocast(precision, device)
        scheduler = sampling_scheduler(self.scheduler.config, sampler)
        shape = unet_sample_shape(unet)
        null_class = unet_num_classes(unet)
        was_training = unet.training
        unet.eval()
        out = []
        n_batches = (len(labels) + batch_size - 1) // batch_size
        bar = tqdm(total=n_batches * num_inference_steps, desc="sampling", disable=not progress, leave=False)
        for start in range(0, len(labels), batch_size):
            y = labels[start:start + batch_size].to(device)  # (B,)
            gens = image_generators(seed, indices[start:start + batch_size])
            x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)  # (B, C, H, W)
            x = x.contiguous(memory_format=layout)
            scheduler.set_timesteps(num_inference_steps)
            step_kwargs = {"eta": eta} if sampler == "ddim" else {}
            tt = torch.empty(len(y), device=device, dtype=torch.long)  # (B,), refilled each step
            for t in scheduler.timesteps:
                tt.fill_(int(t))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    eps = guided_eps(denoiser, x, tt, y, guidance_scale, null_class).float()  # (B, C, H, W)
                x = scheduler.step(eps, t, x, generator=gens, **step_kwargs).prev_sample
                bar.update(1)
            out.append(x.float().clamp(-1, 1).cpu().contiguous())  # the images a PNG or the evaluation sees
        bar.close()
        unet.train(was_training)
        return torch.cat(out) if out else torch.empty(0, *shape)

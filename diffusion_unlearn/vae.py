"""The frozen VAE of a latent DiT: load a diffusers `AutoencoderKL`, or train a small one on a small dataset.

DiT runs on the latents of Stable Diffusion's KL autoencoder (reference §4.1). For data far
from SD's (8×8 grey digits) a small `AutoencoderKL` is trained here instead: the KL-regularised autoencoder of
Rombach et al. (LDM, CVPR 2022, Section 3), reconstruction MSE plus a down-weighted KL to N(0, I), without LDM's
perceptual and adversarial terms. Its `scaling_factor` is measured as LDM does: 1 / std of the latents of the
training images, so that scaled latents have unit variance.

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from diffusion_unlearn.data import BatchStream, ImageDataset
from diffusion_unlearn.fileio import UserError

# Small VAEs by name: 2 levels halve the side (8×8 digits → 4×4×4 latents).
VAE_PRESETS: dict[str, dict] = {
    "digits": dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8),
    "tiny": dict(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4),
}


def build_vae(preset: str, *, channels: int, image_size: int) -> AutoencoderKL:
    """A randomly initialised `AutoencoderKL` of size `preset` for `channels`-channel images."""
    if preset not in VAE_PRESETS:
        raise UserError(f"unknown VAE preset {preset!r}; choose one of {', '.join(VAE_PRESETS)} "
                        "or pass --vae FOLDER (e.g. stabilityai/sd-vae-ft-ema)")
    spec = VAE_PRESETS[preset]
    levels = len(spec["block_out_channels"])
    return AutoencoderKL(in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, sample_size=image_size,
                         mid_block_add_attention=False, **spec)


def load_vae(path: str | Path) -> AutoencoderKL:
    """A diffusers `AutoencoderKL` folder, or the `vae/` of a model folder (e.g. a DiT base model)."""
    path = Path(path)
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise UserError(f"no AutoencoderKL at {path}: pass a diffusers VAE folder (config.json + weights) "
                        "or a DiT model folder holding vae/")
    try:
        return AutoencoderKL.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - corrupt weights or another model class
        raise UserError(f"cannot read the VAE in {folder}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e


def latent_side(vae: AutoencoderKL, image_size: int) -> int:
    """The side of the latents of `image_size` images (one halving per level but the last)."""
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % down:
        raise UserError(f"the VAE halves the image side {len(vae.config.block_out_channels) - 1} times; "
                        f"{image_size}px images do not divide (pass a dataset or a VAE that fit)")
    return image_size // down


def check_vae_fits(vae: AutoencoderKL, dataset: ImageDataset) -> None:
    if int(vae.config.in_channels) != dataset.channels:
        raise UserError(f"the VAE takes {vae.config.in_channels}-channel images, dataset {dataset.name} has "
                        f"{dataset.channels}-channel ones; pass a VAE trained on such images or train one")
    latent_side(vae, dataset.image_size)


def train_vae(vae: AutoencoderKL, dataset: ImageDataset, *, iterations: int, batch_size: int, lr: float,
              kl_weight: float, seed: int, hflip: bool = False, device: str = "cpu") -> list[list[float]]:
    """Fit `vae` in place: loss = mean (x̂ − x)² + kl_weight · KL(q(z|x) ‖ N(0, I)) / (C·H·W), a posterior
    sample decoded (from the global RNG), AdamW, gradients clipped to norm 1; batches drawn with `seed`. Returns
    [iteration, loss] every 50 iterations."""
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    stream = BatchStream(dataset, batch_size, seed=seed, hflip=hflip)
    losses = []
    bar = tqdm(range(iterations), desc="VAE")
    for it in bar:
        x, _ = stream.next()
        x = x.to(device)  # (B, C, H, W)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample  # (B, C, H, W)
        loss = (recon - x).square().mean() + kl_weight * posterior.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if (it + 1) % 50 == 0:
            losses.append([it + 1, loss.item()])
            bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, dataset: ImageDataset, *, batch_size: int = 256, seed: int = 0,
                           device: str = "cpu") -> float:
    """1 / std of posterior samples of every image of `dataset` (LDM's rescaling, SD's 0.18215), stored in
    the VAE's config (`vae.config.scaling_factor`) and returned."""
    generator = torch.Generator(device).manual_seed(seed)
    latents = []
    for start in range(0, len(dataset), batch_size):
        x, _ = dataset.get_batch(torch.arange(start, min(start + batch_size, len(dataset))))
        posterior = vae.encode(x.to(device)).latent_dist
        latents.append(posterior.sample(generator).flatten().cpu())  # (B·C·h·w,)
    factor = 1.0 / torch.cat(latents).std().item()
    vae.register_to_config(scaling_factor=factor)
    return factor

"""Latent caching for a latent DiT: encode a dataset once into VAE posterior moments (fast-DiT's main speed-up).

For each image the cache holds the moments of q(z | x), mean and log-variance (`vae.encode(x).latent_dist.
parameters`, (2C, h, w)), and with horizontal flips on also those of its mirror image: the encoder is not
flip-equivariant, so a flip cannot be applied to latents afterwards. Training then draws z = mean + std·ε afresh
at every use (`LatentDiTBackbone.encode` takes moments as they are) and `BatchStream` picks the flip at random,
so caching changes no distribution, only the cost. (fast-DiT caches one fixed posterior sample per image.)

A cache file is named by a hash of everything its content depends on (the images of the dataset view, the VAE's
weights, flips on or off), so changed inputs never read stale moments; it is written atomically.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffusion_unlearn.data import ImageDataset
from diffusion_unlearn.fileio import UserError, atomic_path

FORMAT = "posterior-moments-v1"
CACHE_SUBDIR = "latents"  # the cache files' folder under a command's --cache-dir


class LatentMoments:
    """Labelled posterior moments `moments` (N, F, 2C, h, w): F = 1 (the images) or 2 (the images, then their
    mirror images). Batches come out as `ImageDataset`'s do, so `BatchStream` and the Fisher take it unchanged."""

    def __init__(self, moments: torch.Tensor, targets: torch.Tensor, class_names: list[str], name: str, split: str):
        self.moments, self.targets = moments, targets.long()  # (N, F, 2C, h, w), (N,)
        self.class_names, self.name, self.split = class_names, name, split

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def flips(self) -> bool:
        return self.moments.shape[1] == 2

    def __len__(self) -> int:
        return len(self.targets)

    def get_batch(self, indices: torch.Tensor, flip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Moments (B, 2C, h, w) and labels (B,) of the items at `indices`; the mirror image's moments where the
        bool (B,) `flip` is set."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        variant = torch.zeros_like(indices)  # (B,)
        if flip is not None:
            if not self.flips:
                raise UserError(f"the latent cache of {self.name} holds no mirror images; encode it with flips on")
            variant = flip.long()
        return self.moments[indices, variant], self.targets[indices]


def vae_fingerprint(vae: AutoencoderKL) -> str:
    """SHA-256 of the VAE's weights (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_record(dataset: ImageDataset, vae: AutoencoderKL, hflip: bool) -> dict[str, str]:
    """Everything a cache file's content depends on (stored in the file's metadata)."""
    return {"format": FORMAT, "dataset": dataset.name, "split": dataset.split, "items": str(len(dataset)),
            "hflip": json.dumps(hflip), "dataset_sha256": dataset.fingerprint(), "vae_sha256": vae_fingerprint(vae)}


def cache_path(cache_dir: str | Path, record: dict[str, str]) -> Path:
    """The cache file for `record`: its name changes whenever the content would."""
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    flips = "flip" if json.loads(record["hflip"]) else "noflip"
    return Path(cache_dir) / f"{record['dataset']}-{record['split']}-n{record['items']}-{flips}-{key}.safetensors"


@torch.no_grad()
def encode_moments(vae: AutoencoderKL, dataset: ImageDataset, *, hflip: bool, batch_size: int = 64) -> torch.Tensor:
    """Posterior moments (N, F, 2C, h, w), float32 on the CPU, of every image (F = 1) and its mirror (F = 2)."""
    out = []
    for start in tqdm(range(0, len(dataset), batch_size), desc=f"encoding {dataset.name} latents", leave=False):
        x, _ = dataset.get_batch(torch.arange(start, min(start + batch_size, len(dataset))))  # (B, C, H, W)
        x = x.to(vae.device, vae.dtype)
        views = [x, x.flip(-1)] if hflip else [x]
        moments = [vae.encode(v).latent_dist.parameters.float().cpu() for v in views]  # F × (B, 2C, h, w)
        out.append(torch.stack(moments, dim=1))  # (B, F, 2C, h, w)
    return torch.cat(out)


def cached_moments(vae: AutoencoderKL, dataset: ImageDataset, *, hflip: bool, cache_dir: str | Path,
                   batch_size: int = 64) -> LatentMoments:
    """`dataset`'s moments from the cache file (`cache_path`), encoded and written first when it is missing."""
    if len(dataset) == 0:
        raise UserError(f"no images to encode in {dataset.name} ({dataset.split}); check the data and the classes")
    record = cache_record(dataset, vae, hflip)
    path = cache_path(cache_dir, record)
    if not path.is_file():
        moments = encode_moments(vae, dataset, hflip=hflip, batch_size=batch_size)
        with atomic_path(path) as tmp:
            save_file({"moments": moments.contiguous(), "targets": dataset.targets.contiguous()}, str(tmp),
                      metadata=record)
    saved = load_file(path)
    return LatentMoments(saved["moments"], saved["targets"], dataset.class_names, dataset.name, dataset.split)


def bounded_subset(dataset: ImageDataset, limit: int, seed: int = 0) -> ImageDataset:
    """At most `limit` items of `dataset`: the first `limit` of a fixed shuffle (`seed`), in dataset order; all of
    them when it is smaller."""
    if len(dataset) <= limit:
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))  # (N,)
    return dataset.subset(order[:limit].sort().values)


def check_latent_cache(method, backbone, retain_limit: int) -> None:
    """A one-line error, before any work, where cached latents cannot stand in for the images: the `method`
    (a `Method`) and the `backbone` (class) each declare whether they can use them (`supports_latent_cache`)."""
    if retain_limit < 1:
        raise UserError(f"--latent-cache-retain must be at least 1, got {retain_limit}")
    if not backbone.supports_latent_cache:
        raise UserError(f"--latent-cache needs a latent (DiT) model; this {backbone.name} one denoises pixels: "
                        "drop the flag")
    if not method.supports_latent_cache:
        raise UserError(f"--latent-cache does not apply to {method.name}: its steps draw images of their own, not "
                        "the dataset's; drop the flag")


def forget_retain_moments(vae: AutoencoderKL, forget_set: ImageDataset, retain_set: ImageDataset, *,
                          retain_limit: int, hflip: bool, cache_dir: str | Path) -> tuple[LatentMoments, LatentMoments]:
    """Cached moments of the whole forget set and of a bounded retain subset (`bounded_subset`): what the
    unlearning steps and the mask draw from instead of images."""
    return (cached_moments(vae, forget_set, hflip=hflip, cache_dir=cache_dir),
            cached_moments(vae, bounded_subset(retain_set, retain_limit), hflip=hflip, cache_dir=cache_dir))

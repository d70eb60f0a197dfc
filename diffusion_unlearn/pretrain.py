"""Train a base model, or with `exclude_class` the retrain baseline (the gold standard, reference §1.6).

A pixel-space DDPM U-Net, or a latent DiT (reference §4.1): its frozen VAE is loaded (`--vae`) or trained on
the same images first (vae.py), and the DiT trains on the VAE's posterior moments, cached once (latents.py).
Under `accelerate launch` it trains on N processes (DDP) with the same result: the global batch `batch_size` is split
into equal slices and every per-sample draw is keyed by (seed, batch, global sample index) (global_batch.py); only
the main process writes.

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from diffusers import AutoencoderKL

from diffusion_unlearn import global_batch
from diffusion_unlearn.config import PretrainConfig, config_to_dict, resolve_device
from diffusion_unlearn.data import BatchStream, ImageDataset, load_dataset
from diffusion_unlearn.ema import EMA
from diffusion_unlearn.fileio import UserError, read_json, write_json
from diffusion_unlearn.latents import CACHE_SUBDIR, cached_moments
from diffusion_unlearn.modelfolder import ModelMeta, save_model_folder
from diffusion_unlearn.optim import OptimizerSpec
from diffusion_unlearn.parameters import trainable_parameters
from diffusion_unlearn.pipelines.registry import backbone_for_architecture
from diffusion_unlearn.preflight import check_writable_dir
from diffusion_unlearn.provenance import RESTART_HINT, Provenance, check_reuse, settings_of, state_record
from diffusion_unlearn.vae import build_vae, check_vae_fits, load_vae, measure_scaling_factor, train_vae

STATE_FILE = "training_state.pt"
TRAINING_FILE = "training.json"


def pretrain(cfg: PretrainConfig, reuse_hint: str = RESTART_HINT) -> dict:
    """Train with AdamW (or `optimizer`), EMA, gradient clipping and CFG label dropout on the linear-β DDPM's
    loss: the U-Net's L_simple, or a latent DiT's mse + vb (`LatentDiTBackbone`).

    The output folder is a model folder rewritten atomically at every checkpoint; while unfinished it also
    holds `training_state.pt`, from which a rerun resumes. A finished folder is reused, not retrained. Both only
    when they were made with the same settings (`--restart` discards them; `reuse_hint` is the fix a refusal
    names).
    """
    out = Path(cfg.out)
    record = training_record(cfg)
    device = resolve_device(cfg.device)
    accelerator = Accelerator(cpu=device == "cpu")
    if cfg.restart:
        if accelerator.is_main_process:
            for name in (STATE_FILE, TRAINING_FILE):
                (out / name).unlink(missing_ok=True)
        accelerator.wait_for_everyone()
    if (out / STATE_FILE).is_file():
        check_reuse(state_record(out / STATE_FILE), record, out / STATE_FILE, reuse_hint, check_version=True)
    elif (out / TRAINING_FILE).is_file():
        summary = read_json(out / TRAINING_FILE)
        check_reuse(finished_record(summary), record, out / TRAINING_FILE, reuse_hint)
        return summary
    check_writable_dir(out, "--out")
    device = str(accelerator.device)  # this process's device under DDP
    dataset = load_dataset(cfg.dataset, cfg.data_root, "train")
    k = dataset.num_classes
    if cfg.exclude_class is not None:
        if not 0 <= cfg.exclude_class < k:
            raise UserError(f"--exclude-class {cfg.exclude_class} is outside the dataset's classes 0..{k - 1}")
        dataset = dataset.with_classes([c for c in range(k) if c != cfg.exclude_class])

    resuming = (out / STATE_FILE).is_file()
    kind = backbone_for_architecture(cfg.backbone)
    kind.check_preset(cfg.backbone, cfg.model_preset)  # an unknown preset fails before a VAE trains
    vae = latent_vae(cfg, dataset, out, resuming, device) if kind.needs_vae else None

    torch.manual_seed(cfg.seed)
    unet = kind.build_denoiser(cfg.backbone, cfg.model_preset, channels=dataset.channels,
                               image_size=dataset.image_size, num_classes=k, vae=vae).to(device)
    global_batch.key_dropout(unet)
    backbone = kind.from_parts(unet, vae, model=accelerator.prepare_model(unet))
    data = (cached_moments(vae, dataset, hflip=cfg.hflip, cache_dir=Path(cfg.cache_dir) / CACHE_SUBDIR)
            if cfg.latent_cache and kind.supports_latent_cache else dataset)
    params = trainable_parameters(unet)
    opt = OptimizerSpec(cfg.optimizer, cfg.lr, weight_decay=cfg.weight_decay).build(params)
    ema = EMA(unet, cfg.ema_rate, warmup=cfg.ema_warmup)
    stream = BatchStream(data, cfg.batch_size, seed=cfg.seed, hflip=cfg.hflip, name="pretrain",
                         rank=accelerator.process_index, world=accelerator.num_processes)
    start, losses = 0, []
    if resuming:
        state = torch.load(out / STATE_FILE, map_location="cpu", weights_only=True)
        unet.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        ema.load_state_dict(state["ema"])
        stream.load_state_dict(state["stream"])
        start, losses = state["iteration"], state["losses"]
        if accelerator.is_main_process:
            print(f"pretrain: resuming {out} from iteration {start} of {cfg.iterations} ({STATE_FILE})",
                  file=sys.stderr)

    meta = ModelMeta(class_names=dataset.class_names, weights=cfg.save_weights, backbone=kind.name, dataset=cfg.dataset,
                     excluded_classes=[] if cfg.exclude_class is None else [cfg.exclude_class],
                     history=[{"op": "pretrain", "iterations": cfg.iterations, "seed": cfg.seed,
                               **({} if vae is None else {"vae": cfg.vae or f"trained: {cfg.vae_preset} preset, "
                                                          f"{cfg.vae_iterations} iterations",
                                                          "vae_scaling_factor": vae.config.scaling_factor})}])

    def checkpoint(iteration: int, final: bool) -> None:
        """The model folder (and, unless final, the resume state: no RNG state, the draws are keyed), written by
        the main process."""
        if not accelerator.is_main_process:
            return
        weights = ema.weights() if cfg.save_weights == "ema" else None
        raw = {k: v.detach().clone() for k, v in unet.state_dict().items()} if weights else None  # buffers too
        if weights:
            ema.copy_to(unet)
        state = None if final else {"provenance": record.to_dict(), "iteration": iteration,
                                    "model": raw or unet.state_dict(),
                                    "optim": opt.state_dict(), "ema": ema.state_dict(),
                                    "stream": stream.state_dict(), "losses": losses}
        save_model_folder(out, unet, meta, vae=vae, extra=None if state is None else {STATE_FILE: state})
        if raw:
            unet.load_state_dict(raw)

    if vae is not None and not resuming:
        checkpoint(0, final=False)  # the VAE is kept from now on: a resumed run trains on the same latents
    unet.train()
    started = time.perf_counter()
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc="pretrain",
               disable=not accelerator.is_main_process)
    for it in bar:
        x, y = stream.next()  # this process's slice of the global batch
        with global_batch.keyed(stream.key):
            loss = backbone.per_sample_loss(x.to(device), y.to(device), cfg_dropout=cfg.cfg_dropout).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the slices' gradients: the global batch's mean
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        lr = learning_rate(cfg, it)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        ema.update()
        if (it + 1) % 50 == 0:
            value = loss.detach().double()
            if accelerator.num_processes > 1:
                value = accelerator.reduce(value, "mean")
            losses.append([it + 1, value.item()])
            bar.set_postfix(loss=f"{losses[-1][1]:.2f}")
        if (it + 1) % cfg.checkpoint_every == 0 and it + 1 < cfg.iterations:
            checkpoint(it + 1, final=False)
    checkpoint(cfg.iterations, final=True)
    summary = {"out": str(out), "iterations": cfg.iterations, "seconds_this_run": time.perf_counter() - started,
               "final_loss": losses[-1][1] if losses else None, "losses": losses, "config": config_to_dict(cfg),
               "provenance": record.to_dict()}
    if accelerator.is_main_process:
        write_json(out / TRAINING_FILE, summary)
    return summary


def learning_rate(cfg: PretrainConfig, k: int) -> float:
    """The lr of iteration k (0-based): `lr`, warmed up linearly over `warmup_iterations`, then constant or
    cosine-decayed towards 0 at `iterations`. A function of k alone, so a resumed run continues the schedule."""
    scale = min(1.0, (k + 1) / cfg.warmup_iterations) if cfg.warmup_iterations else 1.0
    if cfg.lr_schedule == "cosine":
        scale *= 0.5 * (1 + math.cos(math.pi * k / cfg.iterations))
    return cfg.lr * scale


def training_record(cfg: PretrainConfig) -> Provenance:
    """What a training run's state and finished folder are made with: every setting that can change the weights."""
    return Provenance("pretrain", settings_of(cfg))


def finished_record(summary: dict) -> Provenance | None:
    """A finished folder's record (`training.json`); one written before records existed is read from its config."""
    if "provenance" in summary:
        return Provenance.from_dict(summary["provenance"])
    return Provenance("pretrain", settings_of(summary["config"])) if isinstance(summary.get("config"), dict) else None


def latent_vae(cfg: PretrainConfig, dataset: ImageDataset, out: Path, resuming: bool, device: str) -> AutoencoderKL:
    """The DiT's frozen VAE: the one an unfinished run in `out` saved, `cfg.vae`, or a `cfg.vae_preset` VAE
    trained now on `dataset`, its scaling factor measured (1 / std of the latents)."""
    if resuming or cfg.vae:
        vae = load_vae(out if resuming else cfg.vae)
        check_vae_fits(vae, dataset)
    else:
        torch.manual_seed(cfg.seed)
        vae = build_vae(cfg.vae_preset, channels=dataset.channels, image_size=dataset.image_size)
        check_vae_fits(vae, dataset)
        train_vae(vae, dataset, iterations=cfg.vae_iterations, batch_size=cfg.batch_size, lr=cfg.vae_lr,
                  kl_weight=cfg.vae_kl_weight, seed=cfg.seed, hflip=cfg.hflip, device=device)
        measure_scaling_factor(vae, dataset, seed=cfg.seed, device=device)
    return vae.to(device).eval().requires_grad_(False)

"""Typed configs shared by the CLI, YAML presets and the Python API; validation by pydantic, flags by argparse.

Each subcommand has one config class; its nested sections mirror the architecture (`sampler`, `mask`, one
optimizer per side, the method's own `method_args`). A class's field defaults are the only defaults table: the
CLI flags, `--help`, YAML presets and `build_config` all read them. Values resolve as: defaults < the evaluation
protocol (`PROTOCOLS`) < `--preset NAME` < `--config FILE` < flags. Keys may be nested (`sampler: {steps: 20}`,
`--sampler.steps`), dotted (`sampler.steps: 20`) or flat aliases that users already rely on (`--steps`,
`--forget-lr`, `--gamma`, `--ewc-lambda`); a flat alias is resolved through one alias table per class and never
crosses sections. Unknown keys at any depth and bad values are a one-line `UserError` each (docs/architecture.md,
"Configs").

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import sys
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import ConfigDict, NonNegativeInt, PositiveInt, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from diffusion_unlearn.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CACHE = ".cache/diffusion-unlearn"

# Every config class: unknown keys are errors; a YAML number given for a text option (`seeds: 0`) is its text.
STRICT = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
config_class = dataclass(config=STRICT)

# torch built-ins that make sense for fine-tuning a diffusion model; Lion is not in torch (Table 6 row left out).
OptimizerName = Literal["adamw", "adam", "sgd", "rmsprop", "adagrad", "adamax", "nadam", "radam"]


# ----------------------------------------------------------------------------- sections


@config_class
class SamplerConfig:
    """How images are drawn. `guidance_scale` is the standard CFG scale s (ε_u + s(ε_c − ε_u));
    the DDPM lineage's w is s − 1 (`--guidance-w`). A field left None takes the model's backbone default
    once the model is loaded (`sampler_defaults.resolve_sampler`). `sample_seed` seeds the images (per index);
    the run's own `seed` is another setting."""

    ALIAS: ClassVar[str] = "{leaf}"  # flat name of each field in a config holding this section

    sampler: Literal["ddim", "ddpm"] | None = field(
        default=None, metadata={"help": "unset: ddim on DDPM models, ddpm (the paper's respaced sampler) on DiT"})
    steps: PositiveInt | None = field(default=None, metadata={"help": "unset: 50; 250 for DiT's ddpm"})
    eta: float = 0.0
    guidance_scale: float | None = field(
        default=None, metadata={"help": "unset: 3 on DDPM models; on DiT 1.5 (eval, sample --out-dir), 4 (grids)"})
    sample_batch_size: PositiveInt = 500
    sample_seed: int = 0
    sampling_precision: Literal["auto", "fp32", "bf16"] = field(
        default="auto", metadata={"help": "the denoiser's precision while sampling; bf16: autocast, CUDA only; "
                                          "auto: fp32, except bf16 for DiT grids on CUDA"})

    def describe(self) -> dict:
        return {"sampler": self.sampler, "steps": self.steps, "eta": self.eta,
                "guidance_scale": self.guidance_scale, "guidance_w": self.guidance_scale - 1.0,
                "guidance_convention": "eps_u + s*(eps_c - eps_u); lineage w = s - 1",
                "sample_seed": self.sample_seed, "sampling_precision": self.sampling_precision}


@config_class
class OptimizerConfig:
    """One side's optimizer (`forget_optimizer`, `retain_optimizer`; the shared optimizer is the retain one).
    Flat names: `--forget-optim`, `--forget-lr`, `--retain-betas`, ...; `--betas` / `--momentum` set both sides."""

    ALIAS: ClassVar[str] = "{side}_{leaf}"
    BOTH_SIDES: ClassVar[tuple[str, ...]] = ("betas", "momentum")

    name: OptimizerName = field(default="adamw", metadata={"flat_name": "{side}_optim"})
    lr: float = 1e-4  # η_f / η_r
    betas: tuple[float, float] = (0.9, 0.999)  # Adam-family betas
    momentum: float = 0.9  # sgd/rmsprop momentum
    weight_decay: float = 0.0


@config_class
class MaskSettings:
    """A saliency mask: SFRon's Fisher ratio (paper Section 3, reference §2.1.1), m = (F_f + 1e-15)/(F_r + 1e-15) ≥ γ,
    or SalUn's top-k (§2.2), m = 1 on the `topk_fraction` of all weights with the largest |Σ forget-loss
    gradient|. Which of the two a run builds is its method's `mask_kind` (or `mask --kind`)."""

    ALIAS: ClassVar[str] = "{leaf}"

    file: str | None = field(default=None, metadata={
        "flat_name": "mask", "help": "forget: a saved mask file to use instead of computing the method's"})
    gamma: float = 3.0
    topk_fraction: float = 0.5  # SalUn's threshold: the top 50 % (reference §2.2)
    fisher_batch_size: PositiveInt = 128
    fisher_max_batches: PositiveInt | None = None
    fisher_on_guided_output: bool = False  # reference quirk: Fisher of 3ε_c − 2ε_∅ (§7.7)
    fisher_clip: float | None = None  # reference quirk: clip each batch gradient to norm 1.0 (§7.7)
    fisher_guidance_w: float = 2.0


# ----------------------------------------------------------------------------- subcommand configs


@config_class
class PretrainConfig:
    """Train a base model (or, with `exclude_class`, the retrain baseline) on a dataset. `--backbone dit`: a latent
    DiT (`--model-preset digits` or a paper size such as DiT-S/2) on the latents of `--vae FOLDER`, or of a small
    VAE (`--vae-preset`) trained on the same images first; the retrain baseline should share the base's VAE
    (`--vae BASE_FOLDER`)."""

    dataset: str = "digits"
    data_root: str | None = None
    out: str = "runs/base"
    exclude_class: int | None = None
    backbone: Literal["lineage-unet", "diffusers-unet", "dit"] = "lineage-unet"
    model_preset: str = "digits"
    vae: str | None = None  # dit: a diffusers AutoencoderKL folder, or a DiT model folder's vae/; unset: train one
    vae_preset: str = "digits"  # dit without --vae: the VAE trained first (vae.VAE_PRESETS)
    vae_iterations: PositiveInt = 600
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-3  # weight of KL(q(z|x) ‖ N(0, I)) per image dimension beside the MSE
    latent_cache: bool = True  # dit: encode the training set once to posterior moments (under cache_dir)
    cache_dir: str = DEFAULT_CACHE
    iterations: PositiveInt = 1500
    batch_size: PositiveInt = 128
    lr: float = 1e-3
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: lr·½(1 + cos(π k/iterations)) at iteration k
    warmup_iterations: NonNegativeInt = 0  # linear warm-up of the lr over the first iterations (×(k+1)/warmup)
    optimizer: OptimizerName = "adamw"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_rate: float = 0.999
    ema_warmup: bool = True
    cfg_dropout: float = 0.1
    hflip: bool = False
    save_weights: Literal["ema", "raw"] = "ema"
    checkpoint_every: PositiveInt = 500
    restart: bool = False  # discard an unfinished or finished training in --out instead of resuming / reusing it
    seed: int = 0
    device: str = "auto"


@config_class
class MaskConfig:
    """Compute a saliency mask of `kind` for one forgotten class and save it to `--out` (for `forget --mask FILE`)."""

    model: str = ""
    dataset: str = "digits"
    data_root: str | None = None
    forget_class: int = 0
    out: str = "mask.safetensors"
    kind: Literal["fisher-ratio", "topk"] = "fisher-ratio"
    mask: MaskSettings = field(default_factory=MaskSettings)
    seed: int = 0
    device: str = "auto"

    @model_validator(mode="after")
    def _no_input_mask(self) -> MaskConfig:
        if self.mask.file is not None:
            raise UserError("mask.file (--mask FILE) is an input of `forget`; the `mask` command writes its mask "
                            "to --out")
        return self




@config_class
class ForgetConfig:
    """Unlearn one class (paper Algorithm 1) with a method from `diffusion-unlearn methods` (SFRon §2.1 by default).
    Defaults are the correct behaviour; reference quirks are named switches that the paper presets turn on. Each
    method's paper values are its preset (`--preset digits-<method>`); its own arguments are `method_args`."""

    model: str = ""
    dataset: str = "digits"
    data_root: str | None = None
    forget_class: int = 0
    out: str = "runs/forget"
    method: str = field(default="sfron", metadata={"help": "a registered method (`diffusion-unlearn methods`)"})
    method_args: dict[str, Any] = field(default_factory=dict, metadata={"method_args": True})
    optim: Literal["dual", "shared", "dual-m", "dual-v"] = "dual"  # dual-m/-v: only m / only v apart (Table 17)
    schedule: Literal["alternate", "joint"] = "alternate"
    iterations: PositiveInt = 150  # T_out
    forget_steps: NonNegativeInt = 1  # T_f
    retain_steps: NonNegativeInt = 1  # T_r
    batch_size: PositiveInt = 128
    retain_batch_size: PositiveInt | None = None
    forget_optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    retain_optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # also the shared optimizer
    alpha: float = 1.0  # forget-loss weight α
    alpha_schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0
    clip_retain: bool = True  # the DDPM reference clips both steps (DiT's does not, §3.2)
    ema_rate: float = 1e-4  # reference SFRon rate: the EMA tracks the weights (§1.3)
    mask: MaskSettings = field(default_factory=MaskSettings)
    grid_per_class: PositiveInt = 8
    grid_classes: str = "all"  # rows of the before/after grids: 'all', '0,3,5' or '0-9'
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    checkpoint_every: PositiveInt = 25
    log_every: PositiveInt = 10
    hflip: bool = False  # random horizontal flips in the forget and retain batches (the DiT reference's, §4.2)
    latent_cache: bool = False  # DiT: forget and retain batches from cached VAE posterior moments (latents.py)
    latent_cache_retain: PositiveInt = 5000  # ... of at most this many retain images (a fixed random subset)
    cache_dir: str = DEFAULT_CACHE
    gradient_checkpointing: bool = False  # recompute activations in backward (models that support it: DiT)
    mixed_precision: Literal["no", "bf16"] = "no"  # accelerate's autocast of the denoiser
    restart: bool = False  # discard what an earlier run left in --out (state, mask, SA files, outputs) and start over
    seed: int = 0
    device: str = "auto"
    # Stop when forgotten (stopping.py, docs/stopping-and-relearning.md): probe the weights every `probe_every`
    # iterations; stop once fa_in_distribution ≤ target_fa on two consecutive probes, or at max_iterations
    # (which then replaces `iterations` as the loop's length and α's cosine horizon).
    until_forgotten: bool = field(default=False, metadata={
        "help": "probe every --probe-every iterations; stop once fa_in_distribution <= --target-fa on two "
                "consecutive probes, or at --max-iterations (then the loop's length and α's cosine horizon)"})
    classifier: str = field(default="", metadata={"help": "the FA classifier folder (needed by --until-forgotten)"})
    probe_every: PositiveInt = 10
    probe_samples: PositiveInt = 100  # forgotten-class samples per probe (fa_in_distribution)
    probe_retain_per_class: PositiveInt = 10  # samples per retained class per probe (retained accuracy)
    target_fa: float = 0.01
    max_iterations: PositiveInt = 1000

    @property
    def planned_iterations(self) -> int:
        """The loop's length and α's horizon: `max_iterations` with `until_forgotten`, else `iterations`."""
        return self.max_iterations if self.until_forgotten else self.iterations

    @model_validator(mode="after")
    def _check_stopping(self) -> ForgetConfig:
        if self.until_forgotten and not self.classifier:
            raise UserError("--until-forgotten needs --classifier FOLDER (the FA classifier its probes use; train "
                            "one with `diffusion-unlearn train-classifier`)")
        if not 0 <= self.target_fa < 1:
            raise UserError(f"target_fa: must lie in [0, 1) (got {self.target_fa})")
        return self

    @model_validator(mode="after")
    def _check_method_and_steps(self) -> ForgetConfig:
        method = method_class(self.method)
        self.method_args = method.validate_args(self.method_args)  # the method's defaults filled in
        if self.schedule == "alternate" and self.retain_steps == 0 and (
                self.forget_steps == 0 or not method_takes_forget_steps(self.method)):
            raise UserError(f"forget_steps={self.forget_steps}, retain_steps=0: method {self.method} would take no "
                            "step; set --retain-steps (or --forget-steps) to at least 1")
        return self


# What `--protocol NAME` sets, beneath any option given explicitly (preset, --config or flag). `paper` is the
# lineage's evaluation: generalized (DDIM-form) sampler with η = 1 over all 1000 steps, w = 2 (s = 3) (reference
# §1.5), in float32 as the published samplers run; 500 forgotten-class samples for FA (§5.1); 5000 samples per
# retained class for FID (§5.2). Keys are flat option names, resolved through each config's alias table (keys a
# config lacks are skipped).
PROTOCOLS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {"sampler": "ddim", "steps": 1000, "eta": 1.0, "guidance_scale": 3.0, "sampling_precision": "fp32",
              "fa_samples": 500, "retain_samples_per_class": 5000},
}
Protocol = Literal["default", "paper"]


@config_class
class SampleConfig:
    """Draw labelled grids (one row per class), PNG folders named by image index and/or `.npz` sample batches
    (DiT's sample_ddp.py / OpenAI's evaluator: `arr_0` uint8 N×H×W×C, `arr_1` labels). The PNG folder and the
    `.npz` are made through a resumable sample store by any number of processes (`accelerate launch`), the same
    bytes for all; grids by the main process alone."""

    model: str = ""
    protocol: Protocol = "default"  # `paper`: the lineage's 1000-step η = 1 sampler at s = 3 (reference §1.5)
    classes: str = "all"
    per_class: PositiveInt = 8
    grid: str | None = None
    out_dir: str | None = None
    npz: str | None = None  # FILE.npz: the sample set as DiT's / ADM's evaluator reads it
    store: str | None = None  # the sample store folder; unset: OUT_DIR/store, else FILE.store beside --npz
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    device: str = "auto"  # under `accelerate launch` with N > 1 processes: each process's own device


FidProtocol = Literal["standard", "legacy"]  # legacy: the published evaluator's images (§5.2)
FidExtractor = Literal["auto", "inception", "classifier"]


@config_class
class EvalConfig:
    """FA, retained accuracy and FID of a model for one forgotten class."""

    model: str = ""
    protocol: Protocol = "default"  # `paper`: the lineage's sampler and sample counts (PROTOCOLS)
    fid_protocol: FidProtocol = "standard"
    dataset: str = "digits"
    data_root: str | None = None
    forget_class: int = 0
    classifier: str = ""
    out: str = "metrics.json"
    fa_samples: PositiveInt = 500
    retain_samples_per_class: PositiveInt = 200
    fid_extractor: FidExtractor = "auto"
    fid_weights: str | None = None
    fid_reference_count: PositiveInt | None = None
    fid_reference_stats: str | None = None  # FID against this .npz (ours from fid-stats, or ADM's reference batch)
    retrain_model: str | None = None  # forget_fid/forget_kid against this model's forgotten-class samples
    store: str | None = None  # the sample store folder; None: beside --out (metrics.json → metrics.store)
    shard_size: PositiveInt = 500  # images per store shard (one generation batch run per shard)
    cache_dir: str = DEFAULT_CACHE
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    device: str = "auto"


@config_class
class FidStatsConfig:
    """FID reference statistics of a dataset as a file (`.npz`: mu, sigma, count and a JSON record of the
    extractor and its weights hash, dataset, split, selection and protocol), read by `eval` like ADM's reference
    batches. The images are chosen and read as `eval` reads its FID reference."""

    dataset: str = "digits"
    data_root: str | None = None
    split: str = "train"
    image_size: PositiveInt | None = None  # imagefolder: the side the images are ADM-center-cropped to
    exclude_class: int | None = None  # eval's reference leaves out the forgotten class
    count: PositiveInt | None = None  # a uniform random subset of this many (seed 0); unset: all
    fid_protocol: FidProtocol = "standard"
    fid_extractor: FidExtractor = "auto"  # auto: the classifier for 1-channel data (digits), else Inception
    classifier: str = ""  # the FA classifier folder whose penultimate features the `classifier` extractor uses
    fid_weights: str | None = None  # Inception weights file (torch-fidelity's inception-v3-compat)
    cache_dir: str = DEFAULT_CACHE  # the reference features are cached here, shared with `eval`
    out: str = "fid_stats.npz"
    device: str = "auto"


@config_class
class ConvertConfig:
    """Import the lineage's files: a DDPM `ckpt.pth` → model folder, or a mask / Fisher `.pt` → mask file, or
    SA's `fisher_dict.pkl` → an SA Fisher file for `forget --method sa --sa-fisher FILE`.
    DiT: `--from dit-original CKPT --vae VAE_FOLDER --model DiT-XL/2` (the original's `.pt`, a training
    checkpoint's `ema`, or the reference unlearning's `{"model", "args"}`), `--from diffusers-dit FOLDER`
    (`facebook/DiT-XL-2-256` layout) → model folder; `--to dit-original` / `--to diffusers-dit` export one of our
    DiT folders (PATH). Stock diffusers' DiT divides its timestep frequencies by 127, not 128: its outputs differ
    from the original's by up to ~0.04 (docs/dit.md); our own folders and the original `.pt` are exact."""

    path: str = field(default="", metadata={"positional": True, "help": "the file or folder to import or export"})
    from_format: Literal["lineage-ddpm", "lineage-mask", "lineage-sa-fisher", "dit-original", "diffusers-dit"] = field(
        default="lineage-ddpm", metadata={"flag": "--from"})
    to_format: Literal["model-folder", "dit-original", "diffusers-dit"] = field(
        default="model-folder", metadata={"flag": "--to"})  # not model-folder: PATH is our DiT folder to export
    out: str = ""
    vae: str | None = None  # dit-original: the VAE's diffusers folder (e.g. stabilityai/sd-vae-ft-ema)
    dit_size: str | None = field(default=None, metadata={"flag": "--model"})  # dit-original: DiT-XL/2, ...
    num_heads: PositiveInt | None = None  # dit-original: the head count, for a size not in the DiT table
    weights: Literal["raw", "ema"] = "raw"  # raw: what the paper's runs forget from and sample with (§1.4)
    model_preset: str = "cifar10"  # the lineage U-Net configuration of the run (all published runs: cifar10)
    class_names: str = "cifar10"  # "cifar10", "index" (0..K-1, e.g. ImageNet DiTs) or comma-separated names
    remain_fisher: str | None = None  # with a `forget_fisher.pt` PATH: its `remain_fisher.pt`
    gamma: float = 3.0  # ratio threshold for a Fisher pair (paper γ = 3)
    trust_pickle: bool = False  # allow arbitrary unpickling (only for files that need it)


@config_class
class RelearnSettings:
    """`study --relearn K`: after each cell's forget run, `relearn` its model with K forgotten-class images (a
    comma-separated list: one variant per K; 0: retained-class data only), and the base and retrain models alike
    (reference rows). Empty `shots`: no relearning. A field left None takes `relearn`'s default (RelearnConfig)."""

    ALIAS: ClassVar[str] = "relearn_{leaf}"

    shots: str = field(default="", metadata={
        "flat_name": "relearn", "help": "K forgotten-class images to relearn from, e.g. 5 or 1,5,25; empty: none"})
    max_steps: PositiveInt | None = field(default=None, metadata={
        "flat_name": "relearn_steps", "help": "N, the most fine-tuning steps (unset: relearn's --max-steps)"})
    lr: float | None = field(default=None, metadata={"help": "unset: relearn's --lr"})
    batch_size: PositiveInt | None = field(default=None, metadata={"help": "unset: relearn's --batch-size"})
    probe_every: PositiveInt | None = field(default=None, metadata={"help": "unset: relearn's --probe-every"})
    probe_samples: PositiveInt | None = field(default=None, metadata={"help": "unset: relearn's --probe-samples"})
    relearned_at: float | None = field(default=None, metadata={"help": "unset: relearn's --relearned-at"})


@config_class
class StudyConfig:
    """Stability study (paper Table 1/3, Figure 2): every method × optimizer setup × forgotten class × seed, each
    run and evaluated alike. Writes a table of mean ± std, a CSV of every cell and FA/FID-over-iterations plots;
    `--forget-lrs` sweeps the forget lr (shared: its single lr). Finished cells are never rerun. `dual` runs a
    method's alternate schedule with two optimizers; `shared` its preset schedule with one. `sampler` is the
    study's evaluation sampler; a cell's own runs (grids, SA's replay) keep its preset's sampler except the fields
    set here to other than the SamplerConfig defaults (the study's `steps: 20` included). `--until-forgotten` runs
    every cell until forgotten, `--relearn K` relearns every cell's model and the reference models
    (docs/stopping-and-relearning.md)."""

    model: str = ""
    dataset: str = "digits"
    data_root: str | None = None
    classifier: str = ""
    out: str = "runs/study"
    methods: str = "sfron,salun,sa"
    optims: str = "dual,shared"
    classes: str = "all"  # forgotten classes: 'all', '0-9', '0,3,5'
    seeds: str = "0"
    preset_prefix: str = "digits-"  # each method's settings: configs/<prefix><method>.yaml, else its defaults
    iterations: str = ""  # all methods (e.g. 150) or per method (sfron=150,sa=300); empty: the presets'
    batch_size: PositiveInt | None = None  # overrides the presets' batch size
    forget_lrs: str = ""  # lr sensitivity: comma-separated forget lrs (shared: its one lr)
    retrain_dir: str | None = None  # one retrain model folder per forgotten class (any names; read from metadata)
    train_retrain: bool = False  # train the missing retrain baselines into <out>/retrain
    retrain_preset: str = "digits-pretrain"  # how --train-retrain trains them (with exclude_class set)
    fa_samples: PositiveInt = 100
    retain_samples_per_class: PositiveInt = 50
    curve_every: PositiveInt = 30  # iterations between points of the FA/FID curves
    curve_fa_samples: PositiveInt = 50
    curve_retain_per_class: PositiveInt = 20
    fid_protocol: FidProtocol = "standard"
    fid_extractor: FidExtractor = "auto"
    fid_weights: str | None = None
    fid_reference_count: PositiveInt | None = None
    cache_dir: str = DEFAULT_CACHE
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(steps=20))
    jobs: PositiveInt = 1  # cells at once on this machine (inline: processes, local: submitit jobs), cores/jobs threads
    restart: bool = False  # discard the cells, shared files and scores an earlier study left in --out
    # where cells run (docs/cluster.md): in this process, as submitit local jobs, or one SLURM array task per cell
    executor: Literal["inline", "local", "slurm"] = "inline"
    partition: str | None = None  # SLURM partition (cluster default when unset)
    gpus_per_cell: NonNegativeInt = 1  # GPUs of a cell's job (local: only where CUDA is present)
    cpus_per_cell: PositiveInt | None = None  # CPU cores of a SLURM cell's task (cluster default when unset)
    time_limit: PositiveInt = 240  # minutes a cell's job may run; SLURM: a claim older than this is stale
    array_parallelism: PositiveInt = 32  # SLURM array tasks (cells) running at once
    device: str = "auto"
    # Stop when forgotten (docs/stopping-and-relearning.md): every cell's run with `forget --until-forgotten`;
    # the presets' iteration counts no longer apply, `max_iterations` is the cap. Unset: the presets' values
    # (else ForgetConfig's).
    until_forgotten: bool = field(default=False, metadata={
        "help": "run every cell until forgotten (forget --until-forgotten, probes with --classifier); the "
                "presets' iterations are ignored, --max-iterations is the cap"})
    target_fa: float | None = field(default=None, metadata={"help": "unset: the presets' (forget --target-fa)"})
    probe_every: PositiveInt | None = field(default=None, metadata={
        "help": "unset: the presets' (forget --probe-every)"})
    probe_samples: PositiveInt | None = field(default=None, metadata={
        "help": "unset: the presets' (forget --probe-samples)"})
    max_iterations: PositiveInt | None = field(default=None, metadata={
        "help": "the cap of --until-forgotten (unset: the presets', forget --max-iterations)"})
    relearn: RelearnSettings = field(default_factory=RelearnSettings)

    @model_validator(mode="after")
    def _check_stopping(self) -> StudyConfig:
        if self.until_forgotten and self.iterations.strip():
            raise UserError(f"--iterations {self.iterations} has no effect with --until-forgotten; set the cap with "
                            "--max-iterations instead")
        return self


@config_class
class RelearnConfig:
    """How hard is it to bring a forgotten class back? Fine-tune `model` with the plain denoising loss
    (pretraining's, CFG label dropout included) on retained-class data only (shots 0) and on K images of the
    forgotten class (each K of `shots`), for `max_steps` steps; probe fa and fa_in_distribution every `probe_every`
    steps. Writes relearn.json, relearn.png and relearn.md; each variant resumes from its state.pt."""

    model: str = ""
    dataset: str = "digits"
    data_root: str | None = None
    forget_class: int = 0
    classifier: str = ""
    out: str = "runs/relearn"
    shots: str = "0,1,5,25"  # K forgotten-class images per variant; 0: retained-class data only
    max_steps: PositiveInt = 300  # N
    lr: float = 1e-4
    batch_size: PositiveInt = 32
    optimizer: OptimizerName = "adamw"
    grad_clip: float = 1.0
    cfg_dropout: float = 0.1
    probe_every: PositiveInt = 25
    probe_samples: PositiveInt = 100  # forgotten-class samples per probe (the same seeds at every probe)
    relearned_at: float = 0.5  # "relearned": the first probe with fa_in_distribution at or above this
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    checkpoint_every: PositiveInt = 50
    restart: bool = False  # discard the variants an earlier run left in --out
    seed: int = 0
    device: str = "auto"


@config_class
class DemoConfig:
    """The whole path on the embedded digits: base model, classifier, SFRon + DualOptim, evaluation, report.
    `--backbone dit`: a latent DiT on the latents of a small VAE, both trained on the digits first."""

    backbone: Literal["ddpm", "dit"] = "ddpm"
    forget_class: int = 0
    out: str = "runs/demo"
    optim: Literal["dual", "shared"] = "dual"
    cache_dir: str = DEFAULT_CACHE
    seed: int = 0


# The configs below are plain dataclasses (built directly, e.g. `ClassifierConfig(out=...)`); they live here so
# that the CLI's parser needs no heavy import.


@dataclasses.dataclass
class ClassifierConfig:
    """Options of `train-classifier`: the FA classifier, trained on the train split, tested on the test split."""

    dataset: str = "digits"
    data_root: str | None = None
    out: str = "classifiers/digits"
    arch: str | None = None  # None: "digits-cnn" for digits, "resnet34" (the reference's) otherwise
    epochs: int = 20
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    resize: int | None = None  # resize inside the classifier (the reference fine-tunes ResNet-34 at 224)
    init: str | None = None  # ImageNet checkpoint (timm/torchvision state dict) to fine-tune from
    seed: int = 0
    device: str = "auto"


@dataclasses.dataclass
class ImportClassifierConfig:
    """Make an FA classifier folder from a local torchvision or timm ImageNet classifier (a `.pth` state dict or
    `.safetensors`), e.g. torchvision's `resnet34-b627a593.pth`, the reference's DiT classifier (§5.1)."""

    path: str = field(default="", metadata={"positional": True, "help": "the weights file"})
    out: str = ""
    arch: str = "resnet34"  # the timm architecture the file holds (torchvision's resnet18/34/50 share its keys)
    class_names: str = "index"  # 'index' ('0'..'K-1', as `convert --class-names index` names DiT classes) or K names
    image_size: int = 256  # side of the generated images it classifies (DiT-XL/2 256: 256)
    resize: int | None = 224  # resized inside the classifier to this side (the reference: 224)


@dataclasses.dataclass
class MethodsConfig:
    """List the forget methods: the paper each comes from, its mask and forget loss, and its presets."""


def method_argument_classes() -> dict[str, type]:
    """Method name → the dataclass declaring its arguments: the registry (`methods.METHODS`, which holds methods
    registered at run time too) once it is loaded, else the built-ins' torch-free arguments classes
    (method_args.py), so that `forget --help` and a ForgetConfig import no torch."""
    registry = sys.modules.get("diffusion_unlearn.methods")
    if registry is not None and hasattr(registry, "METHODS"):
        return registry.METHODS
    from diffusion_unlearn.method_args import BUILTIN_METHOD_ARGS  # not at module load: it imports this module

    return BUILTIN_METHOD_ARGS


def method_class(name: str) -> type:
    """The class declaring the arguments of the method registered as `name` (method_argument_classes)."""
    classes = method_argument_classes()
    if name not in classes:
        raise UserError(f"method: unknown method {name!r}; choose one of {', '.join(classes)}")
    return classes[name]


def method_takes_forget_steps(name: str) -> bool:
    """Whether the method registered as `name` has a forget loss (imports the methods)."""
    from diffusion_unlearn.methods import METHODS

    return METHODS[name].forget_loss is not None


def forget_registry_caches() -> None:
    """After a method registers: the tables derived from the registered methods are built again."""
    method_arguments.cache_clear()
    alias_table.cache_clear()
    _adapter.cache_clear()


@functools.cache
def method_arguments() -> dict[str, tuple[Any, Any, tuple[str, ...]]]:
    """Every method argument (`method_args` key) → (type, default, the methods that take it)."""
    out: dict[str, tuple[Any, Any, tuple[str, ...]]] = {}
    for name, method in method_argument_classes().items():
        hints = typing.get_type_hints(method)
        for f in dataclasses.fields(method):
            if f.name in method.arguments():
                tp, default, owners = out.get(f.name, (hints[f.name], f.default, ()))
                out[f.name] = (tp, default, (*owners, name))
    return out


# ----------------------------------------------------------------------------- keys: nested, dotted, flat aliases

FieldPath = tuple[str, ...]  # a field's path from the config class, e.g. ("sampler", "steps")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _sections(cls: type) -> dict[str, Any]:
    """Field name → its section class, or `dict` for `method_args` (keys checked against every method)."""
    return {f.name: dict if f.metadata.get("method_args") else _hints(cls)[f.name]
            for f in dataclasses.fields(cls) if f.metadata.get("method_args") or _is_section(_hints(cls)[f.name])}


@functools.cache
def alias_table(cls: type) -> dict[str, tuple[FieldPath, ...]]:
    """Every flat option name of `cls` → the field path(s) it sets: top-level fields, section fields under their
    section's alias (`steps`, `forget_lr`, `gamma`, `mask` → mask.file), both-sides optimizer options (`betas`)
    and method arguments (`ewc_lambda` → method_args.ewc_lambda)."""
    table: dict[str, list[FieldPath]] = {}

    def add(name: str, path: FieldPath, shared: bool = False) -> None:
        if name in table and not shared:
            raise TypeError(f"{cls.__name__}: flat option {name!r} would set both {table[name]} and {path}")
        table.setdefault(name, []).append(path)

    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if f.metadata.get("method_args"):
            for name in method_arguments():
                add(name, (f.name, name))
        elif _is_section(tp):
            side = f.name.split("_")[0]
            for leaf in dataclasses.fields(tp):
                add(leaf.metadata.get("flat_name", tp.ALIAS).format(side=side, leaf=leaf.name), (f.name, leaf.name))
            for leaf in getattr(tp, "BOTH_SIDES", ()):
                add(leaf, (f.name, leaf), shared=True)
        else:
            add(f.name, (f.name,))
    return {name: tuple(paths) for name, paths in table.items()}


def _key(raw: Any) -> str:
    return str(raw).replace("-", "_")


def _set(d: dict, path: FieldPath, value: Any) -> None:
    for p in path[:-1]:
        d = d.setdefault(p, {})
    d[path[-1]] = value


def _merge(dst: dict, src: dict) -> dict:
    """`src` over `dst`, field by field inside sections."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def _nearest(key: str, valid: list[str]) -> str | None:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return close[0]
    return next((v for v in valid if key in v.split("_")), None)  # `seed` → `sample_seed`


def _unknown(where: str, key: str, valid: list[str], root: dict | None) -> UserError:
    """One line naming the full dotted key and the nearest valid key (or, in a section, where it belongs)."""
    near = _nearest(key, valid)
    if near is not None:
        hint = f"did you mean {where + near!r}?"
    elif where and root is not None and key in root:
        hint = f"{key!r} sets {' and '.join('.'.join(p) for p in root[key])}, not a {where[:-1]} setting"
    elif len(valid) <= 12:
        hint = f"valid keys here: {', '.join(valid)}"
    else:
        hint = "run the command with --help for its options"
    return UserError(f"unknown option {where + key!r}; {hint}")


def nest(cls: type, values: dict, *, skip_unknown: bool = False, where: str = "", root: dict | None = None) -> dict:
    """`values` (nested sections, dotted or flat keys, `-` or `_`) as a dict of `cls`'s field paths. A flat alias
    never crosses sections: inside `sampler:` only sampler fields are valid. Options that set both optimizer
    sides (`betas`) are applied before side-specific ones (`forget_betas`). Keys starting with `_` are notes."""
    table, sections = alias_table(cls), _sections(cls)
    out: dict = {}
    for raw, value in sorted(values.items(), key=lambda kv: len(table.get(_key(kv[0]), ())) < 2):
        key = _key(raw)
        if key.startswith("_"):
            continue
        head, dot, rest = key.partition(".")
        if dot and head in sections:
            key, value = head, {rest: value}
        if key in sections and dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if key in sections and isinstance(value, dict):
            if sections[key] is dict:
                sub = {}
                for arg, v in value.items():
                    if _key(arg) not in method_arguments():
                        raise _unknown(f"{where}{key}.", _key(arg), list(method_arguments()), table)
                    sub[_key(arg)] = v
            else:
                sub = nest(sections[key], value, skip_unknown=skip_unknown, where=f"{where}{key}.",
                           root=root or table)
            _merge(out.setdefault(key, {}), sub)
        elif key in table:
            for path in table[key]:
                _set(out, path, value)
        elif not skip_unknown:
            raise _unknown(where, key, list(table), root)
    return out


def _get(cfg: Any, path: FieldPath) -> Any:
    for p in path:
        cfg = cfg[p] if isinstance(cfg, dict) else getattr(cfg, p)
    return cfg


def option_values(cfg: Any) -> dict[str, Any]:
    """Each option of a config instance under its flat name (dotted where no flat name exists) → its value."""
    cls = type(cfg)
    names = {paths[0]: name for name, paths in alias_table(cls).items() if len(paths) == 1}
    out = {}
    for f in dataclasses.fields(cls):
        value = getattr(cfg, f.name)
        if f.name in _sections(cls):
            sub = value.items() if isinstance(value, dict) else dataclasses.asdict(value).items()
            out.update({names.get((f.name, k), f"{f.name}.{k}"): v for k, v in sub})
        else:
            out[f.name] = value
    return out


# ----------------------------------------------------------------------------- validation and building


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _tuple_length(cls: type, loc: tuple) -> int | None:
    tp: Any = cls
    for part in loc:
        hints = _hints(tp) if _is_section(tp) else {}
        if part not in hints:
            return None
        tp = hints[part]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    tp = args[0] if typing.get_origin(tp) is not tuple and len(args) == 1 else tp
    return len(typing.get_args(tp)) if typing.get_origin(tp) is tuple else None


def validation_message(error: ValidationError, cls: type, prefix: str = "") -> str:
    """Pydantic's errors as one line each: the full dotted key, the problem and the value given."""
    lines = []
    for e in error.errors(include_url=False):
        loc = tuple(e["loc"])
        if loc and isinstance(loc[-1], int):  # an element of a tuple
            n = _tuple_length(cls, loc[:-1])
            key = prefix + ".".join(map(str, loc[:-1]))
            lines.append(f"{key}: expects {n or 'more'} values, got {e['input']!r}")
            continue
        key = prefix + ".".join(map(str, loc)) if loc else prefix.rstrip(".") or cls.__name__
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] in ("greater_than", "greater_than_equal"):  # counts: say the least value allowed
            least = e["ctx"].get("gt", e["ctx"].get("ge"))
            message = f"must be at least {least + 1 if e['type'] == 'greater_than' else least}"
        given = e["input"] if isinstance(e["input"], str) else repr(e["input"])  # a flag's text as typed
        shown = "" if e["type"] in ("missing", "unexpected_keyword_argument") else f" (got {given})"
        lines.append(f"{key}: {message}{shown}")
    return "\n".join(lines)


def validate(cls: type, nested: dict, prefix: str = "") -> Any:
    """`cls` built from a dict of its field paths; bad values are one `UserError` (one line per problem)."""
    try:
        return _adapter(cls).validate_python(nested)
    except ValidationError as e:
        raise UserError(validation_message(e, cls, prefix)) from None


def _section_defaults(cls: type) -> dict:
    """The default of each section field of `cls` as a dict (a class may default a section to other values than
    the section class's, e.g. the study's `SamplerConfig(steps=20)`)."""
    out = {}
    for name in _sections(cls):
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out[name] = dataclasses.asdict(default)
    return out


def build_config(cls: type, *layers: dict) -> Any:
    """Build a config from dicts of options (nested, dotted or flat keys), later layers winning field by field,
    over the settings of the evaluation protocol the result names (PROTOCOLS), over the defaults."""
    nested: dict = {}
    for layer in layers:
        _merge(nested, nest(cls, layer))
    protocol = nested.get("protocol")
    if protocol is not None and "protocol" in alias_table(cls):
        if protocol not in PROTOCOLS:
            raise UserError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        nested = _merge(nest(cls, PROTOCOLS[protocol], skip_unknown=True), nested)
    return validate(cls, _merge(_section_defaults(cls), nested))


def protocol_deviations(cfg: Any) -> dict[str, Any]:
    """The settings of `cfg` that differ from those of its protocol (recorded beside every result)."""
    table = alias_table(type(cfg))
    return {k: got for k, v in PROTOCOLS[cfg.protocol].items() if k in table
            and (got := _get(cfg, table[k][0])) != v}


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------- YAML


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value")
    return data


def yaml_values(cls: type, path: str | Path) -> dict:
    """The options a YAML file (a preset or `--config`) sets for `cls`, as a dict of field paths; an unknown key
    is an error naming the file."""
    try:
        return nest(cls, load_yaml(path))
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def preset_path(name: str) -> Path:
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise UserError(f"unknown preset {name!r}; known presets: {', '.join(known) or 'none'}")
    return path


def write_config_yaml(cfg: Any, path: str | Path) -> None:
    """The whole resolved config, nested; `--config` reads it back to the same config."""
    from diffusion_unlearn.fileio import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(_plain(config_to_dict(cfg)), sort_keys=False))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- the command line


@dataclasses.dataclass(frozen=True)
class CliOption:
    """One flag (or positional) of a config class: where its value goes and what `--help` says."""

    dest: str  # a field path, dotted, or a flat name that sets several (`betas`)
    flags: tuple[str, ...]
    type: Any
    default: Any
    help: str = ""
    positional: bool = False
    show_default: bool = True


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def cli_options(cls: type) -> list[CliOption]:
    """Every option of `cls`, derived from its fields: a top-level field is `--name`; a section field is
    `--section.name` and its flat alias (`--steps`); a method argument is `--name` (methods listed in help)."""
    table, defaults = alias_table(cls), cls()
    flat = {paths[0]: name for name, paths in table.items() if len(paths) == 1}
    options = []
    for f in dataclasses.fields(cls):
        tp, default = _hints(cls)[f.name], getattr(defaults, f.name)
        if f.metadata.get("method_args"):
            for name, (atp, adefault, owners) in method_arguments().items():
                options.append(CliOption(f"{f.name}.{name}", (_flag(name), _flag(f"{f.name}.{name}")), atp,
                                         adefault, f"method argument of {', '.join(owners)}"))
        elif _is_section(tp):
            hints = _hints(tp)
            for leaf in dataclasses.fields(tp):
                dotted = f"{f.name}.{leaf.name}"
                alias = flat.get((f.name, leaf.name))
                options.append(CliOption(dotted, ((_flag(alias),) if alias else ()) + (_flag(dotted),),
                                         hints[leaf.name], getattr(default, leaf.name), leaf.metadata.get("help", "")))
            for leaf in getattr(tp, "BOTH_SIDES", ()):
                if table[leaf][0][0] == f.name:  # once, with the first section
                    options.append(CliOption(leaf, (_flag(leaf),), hints[leaf], None,
                                             f"sets {' and '.join('.'.join(p) for p in table[leaf])}",
                                             show_default=False))
        else:
            options.append(CliOption(f.name, (f.metadata.get("flag", _flag(f.name)),), tp, default,
                                     f.metadata.get("help", ""), bool(f.metadata.get("positional"))))
    return options


def _optional_text(text: str) -> str | None:
    """A command-line value for an option that may be unset: `none`/`null` → None."""
    return None if text.lower() in ("none", "null") else text


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per option of `cls` (cli_options), defaults shown in `--help` but suppressed in the result so
    that only flags the user gave override the YAML."""
    parser.add_argument("--config", help="YAML file of options (flags given here override it)")
    parser.add_argument("--preset", help=f"a named YAML preset from {CONFIG_DIR}")
    for opt in cli_options(cls):
        shown = f"(default: {opt.default})" if opt.show_default else ""
        kw: dict[str, Any] = {"default": argparse.SUPPRESS,
                              "help": " ".join([opt.help, shown]).strip().replace("%", "%%")}
        args = [a for a in typing.get_args(opt.type) if a is not type(None)]
        optional = typing.get_origin(opt.type) in (typing.Union, types.UnionType) and len(args) == 1
        base = args[0] if optional else opt.type
        if opt.positional:
            parser.add_argument(opt.dest, nargs="?", **kw)
            continue
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is Literal:
            kw["choices"] = list(typing.get_args(base))
        elif typing.get_origin(base) is tuple:
            kw["nargs"], kw["metavar"] = len(typing.get_args(base)), opt.dest.rsplit(".", 1)[-1].upper()
        else:
            kw["metavar"] = opt.dest.rsplit(".", 1)[-1].upper()
            kw["type"] = _optional_text if optional else None
        parser.add_argument(*opt.flags, dest=opt.dest, **kw)
    if "guidance_scale" in alias_table(cls):
        parser.add_argument("--guidance-w", type=float, default=argparse.SUPPRESS,
                            help="the lineage's guidance w; sets --guidance-scale to 1 + w")


def config_from_args(cls: type, ns: argparse.Namespace) -> Any:
    """`cls` from `--preset`, then `--config`, then the flags given."""
    layers = []
    if getattr(ns, "preset", None):
        layers.append(yaml_values(cls, preset_path(ns.preset)))
    if getattr(ns, "config", None):
        layers.append(yaml_values(cls, ns.config))
    flags = {opt.dest: getattr(ns, opt.dest) for opt in cli_options(cls) if hasattr(ns, opt.dest)}
    if hasattr(ns, "guidance_w"):
        flags["guidance_scale"] = 1.0 + ns.guidance_w
    return build_config(cls, *layers, flags)


def resolve_device(device: str) -> str:
    """`auto` → cuda when a GPU is present, else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} requested but no CUDA GPU is present; use --device cpu")
    return device

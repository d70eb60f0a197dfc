"""Typed configs shared by the CLI and the Python API, YAML presets, and CLI generation from dataclasses.

Each subcommand has one dataclass. Values resolve as: dataclass defaults < `--preset NAME` / `--config FILE`
(YAML) < explicit command-line flags. A nested dataclass field (e.g. `sampler`) is flattened on the command
line (`--steps`, `--guidance-scale`) and may be nested or flat in YAML.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from diffusion_unlearn.fileio import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CACHE = ".cache/diffusion-unlearn"


@dataclass
class SamplerConfig:
    """How images are drawn. `guidance_scale` is the standard CFG scale s (ε_u + s(ε_c − ε_u));
    the DDPM lineage's w is s − 1 (`--guidance-w`). A field left None takes the model's backbone default
    once the model is loaded (`sampler_defaults.resolve_sampler`)."""

    sampler: Literal["ddim", "ddpm"] | None = field(
        default=None, metadata={"help": "unset: ddim on DDPM models, ddpm (the paper's respaced sampler) on DiT"})
    steps: int | None = field(default=None, metadata={"help": "unset: 50; 250 for DiT's ddpm"})
    eta: float = 0.0
    guidance_scale: float | None = field(
        default=None, metadata={"help": "unset: 3 on DDPM models; on DiT 1.5 (eval, sample --out-dir), 4 (grids)"})
    sample_batch_size: int = 500
    seed: int = 0

    def describe(self) -> dict:
        return {"sampler": self.sampler, "steps": self.steps, "eta": self.eta,
                "guidance_scale": self.guidance_scale, "guidance_w": self.guidance_scale - 1.0,
                "guidance_convention": "eps_u + s*(eps_c - eps_u); lineage w = s - 1", "seed": self.seed}


@dataclass
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
    vae_iterations: int = 600
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-3  # weight of KL(q(z|x) ‖ N(0, I)) per image dimension beside the MSE
    latent_cache: bool = True  # dit: encode the training set once to posterior moments (under cache_dir)
    cache_dir: str = DEFAULT_CACHE
    iterations: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_rate: float = 0.999
    ema_warmup: bool = True
    cfg_dropout: float = 0.1
    hflip: bool = False
    save_weights: Literal["ema", "raw"] = "ema"
    checkpoint_every: int = 500
    restart: bool = False  # discard an unfinished or finished training in --out instead of resuming / reusing it
    seed: int = 0
    device: str = "auto"


@dataclass
class MaskConfig:
    """A saliency mask: SFRon's Fisher ratio (reference §2.1.1), m = (F_f + 1e-15)/(F_r + 1e-15) ≥ γ, or SalUn's
    top-k (§2.2), m = 1 on the `topk_fraction` of all weights with the largest |Σ forget-loss gradient|."""

    model: str = ""
    dataset: str = "digits"
    data_root: str | None = None
    forget_class: int = 0
    out: str = "mask.safetensors"
    kind: Literal["fisher-ratio", "topk"] = "fisher-ratio"
    gamma: float = 3.0
    topk_fraction: float = 0.5  # SalUn's threshold: the top 50 % (reference §2.2)
    fisher_batch_size: int = 128
    fisher_max_batches: int | None = None
    fisher_on_guided_output: bool = False  # reference quirk: Fisher of 3ε_c − 2ε_∅ (§7.7)
    fisher_clip: float | None = None  # reference quirk: clip each batch gradient to norm 1.0 (§7.7)
    fisher_guidance_w: float = 2.0
    seed: int = 0
    device: str = "auto"


@dataclass
class ForgetConfig:
    """Unlearn one class (paper Algorithm 1) with a method from `diffusion-unlearn methods` (SFRon §2.1 by default).
    Defaults are the correct behaviour; reference quirks are named switches that the paper presets turn on. Each
    method's paper values are its preset (`--preset digits-<method>`)."""

    model: str = ""
    dataset: str = "digits"
    data_root: str | None = None
    forget_class: int = 0
    out: str = "runs/forget"
    method: Literal["sfron", "salun", "sa", "ga", "rl", "ft"] = "sfron"
    optim: Literal["dual", "shared", "dual-m", "dual-v"] = "dual"  # dual-m/-v: only m / only v apart (Table 17)
    schedule: Literal["alternate", "joint"] = "alternate"
    mask: str | None = None
    iterations: int = 150  # T_out
    forget_steps: int = 1  # T_f
    retain_steps: int = 1  # T_r
    batch_size: int = 128
    retain_batch_size: int | None = None
    forget_optim: str = "adamw"
    retain_optim: str = "adamw"
    forget_lr: float = 1e-4  # η_f
    retain_lr: float = 1e-4  # η_r (also the shared optimizer's lr)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam-family betas of both sides, unless a side sets its own
    momentum: float = 0.9  # sgd/rmsprop momentum of both sides, unless a side sets its own
    forget_betas: tuple[float, float] | None = None
    retain_betas: tuple[float, float] | None = None  # the retain side's are also the shared optimizer's
    forget_momentum: float | None = None
    retain_momentum: float | None = None
    forget_weight_decay: float = 0.0
    retain_weight_decay: float = 0.0
    alpha: float = 1.0  # forget-loss weight α
    alpha_schedule: Literal["cosine", "constant"] = "cosine"
    adaptive_lambda: float = 0.5  # λ of adaptive gradient ascent
    retain_alpha: float = 1.0  # ρ
    grad_clip: float = 1.0
    clip_retain: bool = True  # the DDPM reference clips both steps (DiT's does not, §3.2)
    ema_rate: float = 1e-4  # reference SFRon rate: the EMA tracks the weights (§1.3)
    cfg_dropout: float = 0.1  # label dropout in the retain loss, as pretraining
    cfg_dropout_in_forget_loss: bool = False  # reference quirk (§7.6)
    gamma: float = 3.0
    topk_fraction: float = 0.5  # SalUn mask: share of weights kept
    fisher_batch_size: int = 128
    fisher_max_batches: int | None = None
    fisher_on_guided_output: bool = False
    fisher_clip: float | None = None
    fisher_guidance_w: float = 2.0
    salun_label: Literal["next", "random"] = "next"  # SalUn's pseudo label: (c+1) mod K (reference) or random c' ≠ c
    ewc_lambda: float = 10.0  # SA's EWC weight λ
    sa_samples_per_class: int = 500  # SA replay: generated images per class (all feed the Fisher)
    sa_fisher_timesteps: int = 1000  # SA Fisher: diffusion steps summed per sample (evenly spaced)
    sa_fisher_chunk: int = 50  # SA Fisher: steps per forward pass
    sa_fisher_as_reference: bool = False  # reference quirk (§2.3): SA Fisher on [0, 1] images, 10 % label dropout
    grid_per_class: int = 8
    grid_classes: str = "all"  # rows of the before/after grids: 'all', '0,3,5' or '0-9'
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    checkpoint_every: int = 25
    log_every: int = 10
    hflip: bool = False  # random horizontal flips in the forget and retain batches (the DiT reference's, §4.2)
    latent_cache: bool = False  # DiT: forget and retain batches from cached VAE posterior moments (latents.py)
    latent_cache_retain: int = 5000  # ... of at most this many retain images (a fixed random subset)
    cache_dir: str = DEFAULT_CACHE
    gradient_checkpointing: bool = False  # recompute activations in backward (models that support it: DiT)
    mixed_precision: Literal["no", "bf16"] = "no"  # accelerate's autocast of the denoiser
    restart: bool = False  # discard what an earlier run left in --out (state, mask, SA files, outputs) and start over
    seed: int = 0
    device: str = "auto"

    def mask_config(self, kind: str) -> MaskConfig:
        """This run's mask settings for a mask of `kind` (the method's `mask_kind`)."""
        shared = {f.name for f in dataclasses.fields(MaskConfig)} - {"out", "kind"}
        return MaskConfig(out=str(Path(self.out) / "mask.safetensors"), kind=kind,
                          **{k: getattr(self, k) for k in shared})


# What `--protocol NAME` sets, beneath any option given explicitly (preset, --config or flag). `paper` is the
# lineage's evaluation: generalized (DDIM-form) sampler with η = 1 over all 1000 steps, w = 2 (s = 3) (reference
# §1.5); 500 forgotten-class samples for FA (§5.1); 5000 samples per retained class for FID (§5.2).
PROTOCOLS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {"sampler": "ddim", "steps": 1000, "eta": 1.0, "guidance_scale": 3.0, "fa_samples": 500,
              "retain_samples_per_class": 5000},
}
Protocol = Literal["default", "paper"]


@dataclass
class SampleConfig:
    """Draw labelled grids (one row per class) and/or PNG folders named by image index."""

    model: str = ""
    protocol: Protocol = "default"  # `paper`: the lineage's 1000-step η = 1 sampler at s = 3 (reference §1.5)
    classes: str = "all"
    per_class: int = 8
    grid: str | None = None
    out_dir: str | None = None
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    device: str = "auto"


@dataclass
class EvalConfig:
    """FA, retained accuracy and FID of a model for one forgotten class."""

    model: str = ""
    protocol: Protocol = "default"  # `paper`: the lineage's sampler and sample counts (PROTOCOLS)
    fid_protocol: Literal["standard", "legacy"] = "standard"  # legacy: the published evaluator's images (§5.2)
    dataset: str = "digits"
    data_root: str | None = None
    forget_class: int = 0
    classifier: str = ""
    out: str = "metrics.json"
    fa_samples: int = 500
    retain_samples_per_class: int = 200
    fid_extractor: Literal["auto", "inception", "classifier"] = "auto"
    fid_weights: str | None = None
    fid_reference_count: int | None = None
    cache_dir: str = DEFAULT_CACHE
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    device: str = "auto"


@dataclass
class ConvertConfig:
    """Import the lineage's files: a DDPM `ckpt.pth` → model folder, or a mask / Fisher `.pt` → mask file.
    DiT: `--from dit-original CKPT --vae VAE_FOLDER --model DiT-XL/2` (the original's `.pt`, a training
    checkpoint's `ema`, or the reference unlearning's `{"model", "args"}`), `--from diffusers-dit FOLDER`
    (`facebook/DiT-XL-2-256` layout) → model folder; `--to dit-original` / `--to diffusers-dit` export one of our
    DiT folders (PATH). Stock diffusers' DiT divides its timestep frequencies by 127, not 128: its outputs differ
    from the original's by up to ~0.04 (docs/dit.md); our own folders and the original `.pt` are exact."""

    path: str = field(default="", metadata={"positional": True, "help": "the file or folder to import or export"})
    from_format: Literal["lineage-ddpm", "lineage-mask", "dit-original", "diffusers-dit"] = field(
        default="lineage-ddpm", metadata={"flag": "--from"})
    to_format: Literal["model-folder", "dit-original", "diffusers-dit"] = field(
        default="model-folder", metadata={"flag": "--to"})  # not model-folder: PATH is our DiT folder to export
    out: str = ""
    vae: str | None = None  # dit-original: the VAE's diffusers folder (e.g. stabilityai/sd-vae-ft-ema)
    dit_size: str | None = field(default=None, metadata={"flag": "--model"})  # dit-original: DiT-XL/2, ...
    num_heads: int | None = None  # dit-original: the head count, for a size not in the DiT table
    weights: Literal["raw", "ema"] = "raw"  # raw: what the paper's runs forget from and sample with (§1.4)
    model_preset: str = "cifar10"  # the lineage U-Net configuration of the run (all published runs: cifar10)
    class_names: str = "cifar10"  # "cifar10", "index" (0..K-1, e.g. ImageNet DiTs) or comma-separated names
    remain_fisher: str | None = None  # with a `forget_fisher.pt` PATH: its `remain_fisher.pt`
    gamma: float = 3.0  # ratio threshold for a Fisher pair (paper γ = 3)
    trust_pickle: bool = False  # allow arbitrary unpickling (only for files that need it)


@dataclass
class StudyConfig:
    """Stability study (paper Table 1/3, Figure 2): every method × optimizer setup × forgotten class × seed, each
    run and evaluated alike. Writes a table of mean ± std, a CSV of every cell and FA/FID-over-iterations plots;
    `--forget-lrs` sweeps the forget lr (shared: its single lr). Finished cells are never rerun. `dual` runs a
    method's alternate schedule with two optimizers; `shared` its preset schedule with one."""

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
    batch_size: int | None = None  # overrides the presets' batch size
    forget_lrs: str = ""  # lr sensitivity: comma-separated forget lrs (shared: its one lr)
    retrain_dir: str | None = None  # one retrain model folder per forgotten class (any names; read from metadata)
    train_retrain: bool = False  # train the missing retrain baselines into <out>/retrain
    retrain_preset: str = "digits-pretrain"  # how --train-retrain trains them (with exclude_class set)
    fa_samples: int = 100
    retain_samples_per_class: int = 50
    curve_every: int = 30  # iterations between points of the FA/FID curves
    curve_fa_samples: int = 50
    curve_retain_per_class: int = 20
    fid_extractor: Literal["auto", "inception", "classifier"] = "auto"
    fid_weights: str | None = None
    cache_dir: str = DEFAULT_CACHE
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(steps=20))
    jobs: int = 1  # cells run at once, each in its own process with cores/jobs threads
    restart: bool = False  # discard the cells, shared files and scores an earlier study left in --out
    device: str = "auto"


@dataclass
class DemoConfig:
    """The whole path on the embedded digits: base model, classifier, SFRon + DualOptim, evaluation, report.
    `--backbone dit`: a latent DiT on the latents of a small VAE, both trained on the digits first."""

    backbone: Literal["ddpm", "dit"] = "ddpm"
    forget_class: int = 0
    out: str = "runs/demo"
    optim: Literal["dual", "shared"] = "dual"
    cache_dir: str = DEFAULT_CACHE
    seed: int = 0


# ----------------------------------------------------------------------------- YAML and CLI


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _flat_fields(cls: type) -> dict[str, tuple[tuple[str, ...], Any]]:
    """Map each leaf field name to (path, type), descending into nested dataclasses."""
    out: dict[str, tuple[tuple[str, ...], Any]] = {}
    for name, tp in _field_types(cls).items():
        if _is_dataclass_type(tp):
            for sub, (path, stp) in _flat_fields(tp).items():
                out[sub] = ((name, *path), stp)
        else:
            out[name] = ((name,), tp)
    return out


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args or tp is type(None):
            return None
        raise UserError(f"config field {name!r} cannot be null")
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is Literal:
        if value not in args:
            raise UserError(f"config field {name!r} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split()]
        return tuple(_coerce(v, a, name) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise UserError(f"config field {name!r} expects true/false, got {value!r}")
        return bool(value)
    try:
        return tp(value)
    except (TypeError, ValueError):
        raise UserError(f"config field {name!r} expects {getattr(tp, '__name__', tp)}, got {value!r}") from None


def build_config(cls: type, values: dict[str, Any]) -> Any:
    """Build a config from a (possibly flat) dict; unknown keys are an error naming the valid ones."""
    flat = _flat_fields(cls)
    nested: dict[str, Any] = {}
    for key, value in _with_protocol(cls, values).items():
        key = key.replace("-", "_")
        hints = _field_types(cls)
        if key in hints and _is_dataclass_type(hints[key]) and isinstance(value, dict):
            for sk, sv in value.items():
                path, tp = flat[sk.replace("-", "_")]
                _set_path(nested, path, _coerce(sv, tp, sk))
            continue
        if key not in flat:
            raise UserError(f"unknown option {key!r} for {cls.__name__}; valid: {', '.join(sorted(flat))}")
        path, tp = flat[key]
        _set_path(nested, path, _coerce(value, tp, key))
    return _instantiate(cls, nested)


def _with_protocol(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """`values` over the settings of the protocol they name (PROTOCOLS), for the fields `cls` has."""
    name = values.get("protocol")
    if name is None or "protocol" not in _flat_fields(cls):
        return values
    if name not in PROTOCOLS:
        raise UserError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    fields = _flat_fields(cls)
    return {**{k: v for k, v in PROTOCOLS[name].items() if k in fields}, **values}


def protocol_deviations(cfg: Any) -> dict[str, Any]:
    """The settings of `cfg` that differ from those of its protocol (recorded beside every result)."""
    values = _flat_values(cfg)
    return {k: values[k] for k, v in PROTOCOLS[cfg.protocol].items() if k in values and values[k] != v}


def _set_path(d: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        d = d.setdefault(p, {})
    d[path[-1]] = value


def _instantiate(cls: type, nested: dict) -> Any:
    hints = _field_types(cls)
    kwargs = {k: (_instantiate(hints[k], v) if _is_dataclass_type(hints[k]) else v) for k, v in nested.items()}
    return cls(**kwargs)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value")
    return data


def preset_path(name: str) -> Path:
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise UserError(f"unknown preset {name!r}; known presets: {', '.join(known) or 'none'}")
    return path


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per leaf field (`forget_class` → `--forget-class`), defaults suppressed so that only
    flags the user gave override the YAML."""
    parser.add_argument("--config", help="YAML file of options (flags given here override it)")
    parser.add_argument("--preset", help=f"a named YAML preset from {CONFIG_DIR}")
    defaults = _flat_values(cls())
    metadata = _field_metadata(cls)
    for name, (path, tp) in _flat_fields(cls).items():
        flag = metadata.get(name, {}).get("flag", "--" + name.replace("_", "-"))
        help_default = " ".join([metadata.get(name, {}).get("help", ""), f"(default: {defaults[name]})"]).strip()
        base = _unwrap_optional(tp)
        if metadata.get(name, {}).get("positional"):
            parser.add_argument(name, nargs="?", default=argparse.SUPPRESS, help=help_default)
        elif base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_default)
        elif typing.get_origin(base) is Literal:
            parser.add_argument(flag, dest=name, choices=list(typing.get_args(base)), default=argparse.SUPPRESS,
                                help=help_default)
        elif typing.get_origin(base) is tuple:
            parser.add_argument(flag, dest=name, nargs=len(typing.get_args(base)), default=argparse.SUPPRESS,
                                help=help_default)
        else:
            parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_default)
    if "guidance_scale" in _flat_fields(cls):
        parser.add_argument("--guidance-w", type=float, default=argparse.SUPPRESS,
                            help="the lineage's guidance w; sets --guidance-scale to 1 + w")


def _field_metadata(cls: type) -> dict[str, Any]:
    """Leaf field name → its dataclass field metadata (`flag`, `help`, `positional`), nested fields included."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        out.update(_field_metadata(tp) if _is_dataclass_type(tp) else {f.name: f.metadata})
    return out


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0]
    return tp


def _flat_values(inst: Any) -> dict[str, Any]:
    """Leaf field name → value of a config instance (nested dataclasses flattened)."""
    out = {}
    for name, (path, _) in _flat_fields(type(inst)).items():
        v = inst
        for p in path:
            v = getattr(v, p)
        out[name] = v
    return out


def config_from_args(cls: type, ns: argparse.Namespace) -> Any:
    values: dict[str, Any] = {}
    if getattr(ns, "preset", None):
        values.update(yaml_values(cls, preset_path(ns.preset)))
    if getattr(ns, "config", None):
        values.update(yaml_values(cls, ns.config))
    flat = _flat_fields(cls)
    for name in flat:
        if hasattr(ns, name):
            values[name] = getattr(ns, name)
    if hasattr(ns, "guidance_w"):
        values["guidance_scale"] = 1.0 + ns.guidance_w
    return build_config(cls, values)


def yaml_values(cls: type, path: str | Path) -> dict:
    """The options a YAML file (a preset or `--config`) sets for `cls`: nested sections flattened, documentation
    keys (`_source`, ...) left out."""
    return _flatten_yaml(cls, load_yaml(path))


def _flatten_yaml(cls: type, data: dict) -> dict:
    hints = _field_types(cls)
    out: dict[str, Any] = {}
    for k, v in data.items():
        k = k.replace("-", "_")
        if k in hints and _is_dataclass_type(hints[k]) and isinstance(v, dict):
            out.update({sk.replace("-", "_"): sv for sk, sv in v.items()})
        elif k.startswith("_"):
            continue  # documentation keys such as `_source` in presets
        else:
            out[k] = v
    return out


def write_config_yaml(cfg: Any, path: str | Path) -> None:
    from diffusion_unlearn.fileio import atomic_path

    data = config_to_dict(cfg)
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(_plain(data), sort_keys=False))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def resolve_device(device: str) -> str:
    """`auto` → cuda when a GPU is present, else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} requested but no CUDA GPU is present; use --device cpu")
    return device

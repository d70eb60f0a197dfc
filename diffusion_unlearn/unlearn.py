"""The unlearning loop (paper Algorithm 1), written once for every method, backbone and optimizer setup.

Per outer iteration k: α_k; T_f forget steps (mask → clip → forget optimizer); T_r retain steps (clip →
retain optimizer); one EMA update. `joint` instead takes one step on ℓ_R + α_k·ℓ_F. The method (methods/)
supplies the losses and declares its mask and its preparation; a method without a forget loss (FT) takes
retain steps only. The loop runs under accelerate on any number of processes (DDP) with the same result: the
global batch `batch_size` is split into equal slices, every per-sample draw is keyed by (seed, stream, batch,
global sample index) (global_batch.py), the losses are means over the global batch, and the mask, optimizers and
EMA are the same on every process. It saves a resumable state (no RNG state: the streams' batch counters) every
`checkpoint_every` iterations, from the main process, and stops on a non-finite loss keeping the last good state.

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from diffusion_unlearn import global_batch
from diffusion_unlearn.config import ForgetConfig, MaskConfig, config_to_dict, resolve_device, write_config_yaml
from diffusion_unlearn.data import BatchStream, ImageDataset, forget_retain_split
from diffusion_unlearn.ema import EMA
from diffusion_unlearn.fileio import (UserError, WriteError, append_jsonl, atomic_path, file_hash,
                                      save_safetensors_atomic, torch_save_atomic)
from diffusion_unlearn.grids import save_image_atomic
from diffusion_unlearn.latents import CACHE_SUBDIR, check_latent_cache, forget_retain_moments
from diffusion_unlearn.methods import METHODS, Method, build_method
from diffusion_unlearn.modelfolder import load_model_and_data, save_model_folder
from diffusion_unlearn.optim import DualOptim, OptimizerSpec
from diffusion_unlearn.parameters import trainable_parameters
from diffusion_unlearn.pipelines.base import Backbone
from diffusion_unlearn.pipelines.sampling import Pipeline, class_grid, parse_classes
from diffusion_unlearn.preflight import check_disk_for, check_readable_file, check_writable_dir
from diffusion_unlearn.provenance import RESTART_HINT, Provenance, check_reuse, settings_of, state_record
from diffusion_unlearn.saliency import (GradientMask, compute_mask, load_mask, mask_density, mask_description,
                                        mask_metadata, save_mask)
from diffusion_unlearn.sampler_defaults import resolve_sampler
from diffusion_unlearn.stopping import (STOP_SETTINGS, STOPPING_FILE, UntilForgotten, check_stopping_options, finish,
                                        probe_measure, until_forgotten)

StepCallback = Callable[[int, str], None]  # (iteration, "forget" | "retain" | "joint"), after each step


@dataclass
class Probe:
    """Metrics of the weights being unlearned (e.g. FA and FID, for curves over iterations as the paper's
    Figure 2), measured after every `every`-th iteration and after the last; merged into that iteration's log
    record, so a resumed run keeps them. `measure` gets the model's pipeline; the global RNG is left as it was."""

    every: int
    measure: Callable[[Pipeline], dict]


class NonFiniteLossError(UserError):
    pass


def alpha_at(k: int, total: int, alpha: float, schedule: str) -> float:
    """α_k = α·(1 + cos(πk/K))/2 for the cosine schedule (reference losses.py), else α."""
    if schedule == "cosine":
        return alpha * (1.0 + math.cos(math.pi * k / total)) / 2.0
    return alpha


def optimizer_spec(cfg: ForgetConfig, side: str) -> OptimizerSpec:
    """The forget or retain optimizer of a run (`forget_optimizer` / `retain_optimizer`)."""
    opt = getattr(cfg, f"{side}_optimizer")
    return OptimizerSpec(opt.name, opt.lr, tuple(opt.betas), opt.momentum, opt.weight_decay)


@dataclass
class OutputPaths:
    root: Path

    def __getattr__(self, name: str) -> Path:
        files = {"state": "state.pt", "log": "log.jsonl", "config": "config.yaml", "mask": "mask.safetensors",
                 "model": "model", "ema": "ema.safetensors", "optimizers": "optimizers.pt",
                 "grid_before": "grid-before.png", "grid_after": "grid-after.png", "stopping": STOPPING_FILE}
        if name not in files:
            raise AttributeError(name)
        return self.root / files[name]


# ----------------------------------------------------------------------------- checks before any work

# Copies of the model's weights a run keeps on disk at its peak: state.pt (weights, EMA, up to four optimizer
# moments) written atomically beside the previous one, or the last state.pt beside the final outputs.
CHECKPOINT_COPIES = {"state.pt (weights, EMA, optimizer moments), old and new": 12}


def check_output_folder(out: Path, model: Path) -> None:
    out, model = out.resolve(), model.resolve()
    if out == model or model in out.parents:
        raise UserError(f"--out {out} is the input model folder or inside it; choose another folder "
                        "(the input model is never written to)")


def check_forget_options(cfg: ForgetConfig) -> None:
    """Input files, before any model is loaded (counts are checked by the config itself)."""
    if cfg.mask.file:
        check_readable_file(cfg.mask.file, "mask file", "make one with `diffusion-unlearn mask`")
    check_stopping_options(cfg)


# ----------------------------------------------------------------------------- provenance of a run folder


def run_record(cfg: ForgetConfig) -> Provenance:
    """What a run's `state.pt` was made with: every setting that can change the result (the stop settings only
    with --until-forgotten)."""
    settings = settings_of(cfg)
    if not cfg.until_forgotten:
        settings = {k: v for k, v in settings.items() if k not in STOP_SETTINGS}
    return Provenance("forget-state", settings)


def mask_record(cfg: ForgetConfig) -> Provenance | None:
    """What the run's `mask.safetensors` is: a copy of `--mask FILE` (by content), the mask the method's settings
    compute, or None where the run uses no mask."""
    if cfg.mask.file:
        return Provenance("mask", {"kind": "file", "file": str(Path(cfg.mask.file).resolve()),
                                   "file_sha256": file_hash(cfg.mask.file)})
    kind = METHODS[cfg.method].mask_kind
    made_from = {"model": cfg.model, "dataset": cfg.dataset, "data_root": cfg.data_root,
                 "forget_class": cfg.forget_class, "seed": cfg.seed, "kind": kind, "mask": config_to_dict(cfg.mask)}
    return None if kind is None else Provenance("mask", settings_of(made_from))


def check_run_folder(paths: OutputPaths, cfg: ForgetConfig) -> None:
    """A run folder's resume state and mask are reused only when they were made with this run's settings (the
    state also in this code's format); otherwise one line names what differs and the fix."""
    if paths.state.exists():
        check_reuse(state_record(paths.state), run_record(cfg), paths.state, check_version=True)
    expected = mask_record(cfg)
    if paths.mask.exists():
        if expected is None:
            raise UserError(f"{paths.mask} is the mask of an earlier run, and method {cfg.method} uses none; "
                            f"{RESTART_HINT}")
        check_reuse(Provenance.from_dict(mask_metadata(paths.mask).get("provenance")), expected, paths.mask)


def discard_run(paths: OutputPaths) -> None:
    """`--restart`: remove what an earlier run wrote into the folder (its files only, nothing else)."""
    import shutil

    names = ("state", "log", "config", "mask", "ema", "optimizers", "grid_before", "grid_after", "stopping")
    cached = [paths.root / name for method in METHODS.values() for name in method.artefacts]
    for path in [getattr(paths, n) for n in names] + cached:
        path.unlink(missing_ok=True)
    shutil.rmtree(paths.model, ignore_errors=True)


# ----------------------------------------------------------------------------- the loop


class Unlearner:
    """Holds everything the loop mutates, so that it can be saved and restored bitwise."""

    def __init__(self, cfg: ForgetConfig, backbone: Backbone, forget_set: ImageDataset,
                 retain_set: ImageDataset, grad_mask: GradientMask | None, accelerator: Accelerator,
                 method: Method | None = None, record: Provenance | None = None):
        self.cfg, self.backbone, self.accelerator, self.grad_mask = cfg, backbone, accelerator, grad_mask
        self.record = record if record is not None else run_record(cfg)  # stored in every state
        self.method = method if method is not None else build_method(cfg)
        denoiser = backbone.denoiser
        self.optim = DualOptim(denoiser.parameters(), optimizer_spec(cfg, "forget"), optimizer_spec(cfg, "retain"),
                               mode=cfg.optim, masks=None if grad_mask is None else grad_mask.factors)
        self.params = trainable_parameters(denoiser)
        self.ema = EMA(denoiser, cfg.ema_rate)
        global_batch.key_dropout(denoiser)
        share = {"rank": accelerator.process_index, "world": accelerator.num_processes}
        self.forget_stream = BatchStream(forget_set, cfg.batch_size, seed=cfg.seed, hflip=cfg.hflip, name="forget",
                                         **share)
        self.retain_stream = BatchStream(retain_set, cfg.retain_batch_size or cfg.batch_size, seed=cfg.seed,
                                         hflip=cfg.hflip, name="retain", **share)
        self.iteration = 0
        self.saved_iteration: int | None = None  # iterations done in the last state written (or resumed from)

    # -- state

    def state_dict(self) -> dict:
        """Everything the loop mutates; the same under any process count (the draws are keyed, no RNG state)."""
        return {"provenance": self.record.to_dict(), "iteration": self.iteration,
                "model": self.backbone.denoiser.state_dict(),
                "optim": self.optim.state_dict(), "ema": self.ema.state_dict(),
                "forget_stream": self.forget_stream.state_dict(), "retain_stream": self.retain_stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = self.saved_iteration = state["iteration"]
        self.backbone.denoiser.load_state_dict(state["model"])
        self.optim.load_state_dict(state["optim"])
        self.ema.load_state_dict(state["ema"])
        self.forget_stream.load_state_dict(state["forget_stream"])
        self.retain_stream.load_state_dict(state["retain_stream"])

    # -- steps

    def _loss(self, stream: BatchStream, loss: Callable[[Backbone, torch.Tensor, torch.Tensor], torch.Tensor]
              ) -> torch.Tensor:
        """`loss(backbone, x, y)` on this process's slice of the stream's next global batch, its draws keyed."""
        x, y = stream.next()
        with global_batch.keyed(stream.key):
            return loss(self.backbone, x.to(self.accelerator.device), y.to(self.accelerator.device))

    def _global_value(self, loss: torch.Tensor) -> float:
        """A loss over the global batch: the mean of the processes' shares (equal slices)."""
        value = loss.detach().double()
        if self.accelerator.num_processes > 1:
            value = self.accelerator.reduce(value, "mean")
        return value.item()

    def _backward(self, loss: torch.Tensor, phase: str, *, mask: bool, clip: bool) -> dict:
        value = self._global_value(loss)
        if not math.isfinite(value):
            raise NonFiniteLossError(f"{phase} loss became {value} at iteration {self.iteration}; "
                                     f"{self.saved_note()}; lower the learning rates or α and rerun with --restart "
                                     "or a new --out (a run with other settings never resumes this state)")
        self.optim.zero_grad()
        self.accelerator.backward(loss)
        if mask and self.grad_mask is not None:
            self.grad_mask.apply()  # mask first, then clip (SFRon order, reference §2.1 step 3)
        norm = self.accelerator.clip_grad_norm_(self.params, self.cfg.grad_clip) if clip else None
        return {f"{phase}_loss": value, **({f"{phase}_grad_norm": float(norm)} if norm is not None else {})}

    def saved_note(self) -> str:
        """Which state a stopped run leaves behind, in words."""
        if self.saved_iteration is None:
            return "no state was saved yet (nothing to resume)"
        return f"state.pt holds the last good state, after {self.saved_iteration} iterations"

    def run_iteration(self, callback: StepCallback | None) -> dict:
        cfg, k = self.cfg, self.iteration
        alpha = alpha_at(k, cfg.planned_iterations, cfg.alpha, cfg.alpha_schedule)
        record: dict = {"iteration": k, "alpha": alpha}
        self.backbone.model.train()
        forgets = self.method.forget_loss is not None
        if cfg.schedule == "alternate":
            for _ in range(cfg.forget_steps if forgets else 0):
                loss = alpha * self._loss(self.forget_stream, self.method.forget_loss)
                record |= self._backward(loss, "forget", mask=True, clip=True)
                self.optim.forget_step()
                callback and callback(k, "forget")
            for _ in range(cfg.retain_steps):
                loss = self._loss(self.retain_stream, self.method.retain_loss)
                record |= self._backward(loss, "retain", mask=self.method.mask_retain, clip=cfg.clip_retain)
                self.optim.retain_step()
                callback and callback(k, "retain")
        else:  # joint: one step on ℓ_R + α_k ℓ_F with the retain optimizer; the mask is applied (§7.2 fixed)
            weighted = []
            if forgets:
                forget = self._loss(self.forget_stream, self.method.forget_loss)
                record |= {"forget_loss": self._global_value(forget)}
                weighted.append(alpha * forget)
            retain = self._loss(self.retain_stream, self.method.retain_loss)
            record |= self._backward(retain + sum(weighted), "joint", mask=True, clip=True)
            self.optim.retain_step()
            callback and callback(k, "joint")
        self.ema.update()
        self.iteration = k + 1
        return record

    def run(self, paths: OutputPaths, callback: StepCallback | None = None,
            probe: Callable[[], dict] | None = None, probe_every: int = 0,
            stopper: UntilForgotten | None = None) -> None:
        """Iterate to `planned_iterations`, or until `stopper` decides (its decision replayed on resume)."""
        cfg, acc, total = self.cfg, self.accelerator, self.cfg.planned_iterations
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=self.iteration, desc=f"forget {cfg.method}+{cfg.optim}",
                   disable=not acc.is_main_process)
        while self.iteration < total and not (stopper is not None and stopper.reason):
            t0 = time.perf_counter()
            record = self.run_iteration(callback)
            record["seconds"] = time.perf_counter() - t0
            probes = [(probe_every, probe)] if probe is not None else []
            probes += [(stopper.every, lambda: stopper.probe(self.iteration))] if stopper is not None else []
            for every, measure in probes:
                if self.iteration % every == 0 or self.iteration == total:
                    self.backbone.model.eval()
                    with torch.random.fork_rng(devices=[]):
                        record |= measure()
            if stopper is not None:
                stopper.reason = _main_process_value(stopper.reason, acc)
            stop = stopper is not None and stopper.reason is not None
            checkpoint = self.iteration % cfg.checkpoint_every == 0 or self.iteration == total or stop
            if acc.is_main_process:
                try:
                    append_jsonl(paths.log, record)
                    if checkpoint:
                        torch_save_atomic(self.state_dict(), paths.state)
                except WriteError as e:
                    raise WriteError(f"{e}; {self.saved_note()}") from e
                bar.update(1)
                bar.set_postfix(f=f"{record.get('forget_loss', 0):.3g}", r=f"{record.get('retain_loss', 0):.3g}")
            if checkpoint:
                self.saved_iteration = self.iteration
            acc.wait_for_everyone()
        bar.close()


def _main_process_value(value: str | None, acc: Accelerator) -> str | None:
    """The main process's value (a stop decision) on every process: each probes alike, one decides."""
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        value = broadcast_object_list([value])[0]
    return value


# ----------------------------------------------------------------------------- the `forget` subcommand


def _truncate_log(path: Path, iteration: int) -> None:
    """On resume, drop log records of iterations that will be run again."""
    if not path.exists():
        return
    import json

    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["iteration"] < iteration]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep))


def _log_records(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def forget(cfg: ForgetConfig, callback: StepCallback | None = None, probe: Probe | None = None) -> dict:
    """Unlearn `cfg.forget_class`; write model, mask, config, log, optimizer states and grids to `cfg.out`.
    A folder holding `state.pt` from a killed run resumes where it stopped."""
    out, model_dir = Path(cfg.out), Path(cfg.model)
    check_forget_options(cfg)
    check_output_folder(out, model_dir)
    paths = OutputPaths(out)
    accelerator = Accelerator(cpu=resolve_device(cfg.device) == "cpu", mixed_precision=cfg.mixed_precision)
    if cfg.restart:
        if accelerator.is_main_process:
            discard_run(paths)
        accelerator.wait_for_everyone()
    if paths.model.exists() and not paths.state.exists():
        raise UserError(f"{out} already holds a finished run; choose another --out, or pass --restart to discard it")
    check_run_folder(paths, cfg)
    record = run_record(cfg)
    check_writable_dir(out, "--out")
    if model_dir.is_dir():
        check_disk_for(out, model_dir, CHECKPOINT_COPIES)
    loaded, dataset = load_model_and_data(model_dir, cfg.dataset, cfg.data_root, cfg.forget_class,
                                          accelerator.device)
    stop_measure = probe_measure(cfg, loaded, dataset, accelerator.device) if cfg.until_forgotten else None
    cfg = replace(cfg, sampler=resolve_sampler(cfg.sampler, loaded.meta.backbone, "grid",  # grids, SA replay
                                               accelerator.device))
    if cfg.latent_cache:
        check_latent_cache(build_method(cfg), loaded.backbone_class, cfg.latent_cache_retain)
    grid_classes = parse_classes(cfg.grid_classes, loaded.meta.num_classes)
    if cfg.gradient_checkpointing and not getattr(loaded.denoiser, "_supports_gradient_checkpointing", False):
        raise UserError(f"{type(loaded.denoiser).__name__} does not support --gradient-checkpointing; drop the flag")
    if cfg.gradient_checkpointing and global_batch.has_dropout(loaded.denoiser):
        raise UserError(f"{type(loaded.denoiser).__name__} has dropout, whose keyed masks a recomputed forward "
                        "would draw anew; drop --gradient-checkpointing")
    mask = load_mask(cfg.mask.file, loaded.denoiser) if cfg.mask.file else None
    made_mask = mask_record(cfg)
    forget_set, retain_set = forget_retain_split(dataset, cfg.forget_class)

    out.mkdir(parents=True, exist_ok=True)
    resuming = paths.state.exists()
    torch.manual_seed(cfg.seed)
    unet = loaded.denoiser  # the trainable denoiser (U-Net or DiT transformer; a DiT's VAE stays frozen)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    backbone = loaded.backbone()
    method = build_method(cfg)
    retain_set = method.prepare(backbone, forget_set, retain_set, out)
    if cfg.latent_cache:  # the VAE encodes each image once, not at every step
        forget_set, retain_set = forget_retain_moments(loaded.vae, forget_set, retain_set, hflip=cfg.hflip,
                                                       retain_limit=cfg.latent_cache_retain,
                                                       cache_dir=Path(cfg.cache_dir) / CACHE_SUBDIR)
    if mask is None and paths.mask.exists():  # its provenance matched (check_run_folder)
        mask = load_mask(paths.mask, unet)
    elif mask is None and method.mask_kind is not None:
        mask = compute_mask(backbone, forget_set, retain_set, cfg.mask, method.mask_kind, cfg.seed)
    if mask is not None and not paths.mask.exists() and accelerator.is_main_process:
        made = {"kind": "file", "forget_class": cfg.forget_class} if cfg.mask.file else \
            mask_description(cfg.mask, method.mask_kind, cfg.forget_class)
        save_mask(paths.mask, mask, {**made, "source": str(cfg.mask.file or "computed"),
                                     "provenance": made_mask.to_dict()})
    if accelerator.is_main_process:
        write_config_yaml(replace(cfg, restart=False), paths.config)  # passed back with --config, it resumes
    names = loaded.meta.class_names
    grid = lambda title: class_grid(loaded.pipeline, names, grid_classes, cfg.grid_per_class,  # noqa: E731
                                    cfg.sampler, title)
    if accelerator.is_main_process and not (resuming and paths.grid_before.exists()):
        save_image_atomic(grid(f"before: {model_dir.name}"), paths.grid_before)

    backbone = loaded.backbone(model=accelerator.prepare_model(unet))
    grad_mask = GradientMask(unet, mask) if mask is not None else None
    unlearner = Unlearner(cfg, backbone, forget_set, retain_set, grad_mask, accelerator, method, record)
    stopper = None if stop_measure is None else until_forgotten(cfg, lambda: stop_measure(loaded.pipeline))
    if resuming:
        unlearner.load_state_dict(torch.load(paths.state, map_location="cpu", weights_only=True))
        if accelerator.is_main_process:
            _truncate_log(paths.log, unlearner.iteration)
            print(f"forget: resuming {out} from iteration {unlearner.iteration} of {cfg.planned_iterations} "
                  "(state.pt)", file=sys.stderr)
        accelerator.wait_for_everyone()  # the log holds only the iterations kept
        if stopper is not None:  # the probes and decisions of the iterations kept
            stopper.replay(_log_records(paths.log))
    elif paths.log.exists() and accelerator.is_main_process:
        paths.log.unlink()
    accelerator.wait_for_everyone()  # every process has read state.pt before the main one rewrites it
    started = time.perf_counter()
    measure = (lambda: probe.measure(loaded.pipeline)) if probe is not None else None
    unlearner.run(paths, callback, measure, probe.every if probe is not None else 0, stopper)
    seconds = time.perf_counter() - started
    stopping = None if stopper is None else stopper.summary()

    if accelerator.is_main_process:
        meta = replace(loaded.meta, weights="raw",
                       forgotten_classes=sorted({*loaded.meta.forgotten_classes, cfg.forget_class}),
                       history=[*loaded.meta.history, {"op": "forget", "method": cfg.method, "optim": cfg.optim,
                                                       "forget_class": cfg.forget_class, "source": str(model_dir),
                                                       "iterations": unlearner.iteration,
                                                       "provenance": record.to_dict()}])
        save_model_folder(paths.model, unet, meta, vae=loaded.vae)
        save_safetensors_atomic(unlearner.ema.weights(), paths.ema)
        torch_save_atomic(unlearner.optim.state_dict(), paths.optimizers)
        save_image_atomic(grid(f"after: {cfg.method}+{cfg.optim}, forgot {names[cfg.forget_class]}"),
                          paths.grid_after)
        if stopping is not None:
            finish(stopping, out)
        paths.state.unlink()
    return {"out": str(out), "model": str(paths.model), "mask_density": None if mask is None else mask_density(mask),
            "seconds": seconds, "config": config_to_dict(cfg), **({"stopping": stopping} if stopping else {})}


def mask(cfg: MaskConfig) -> dict:
    """The `mask` subcommand: SFRon's Fisher-ratio or SalUn's top-k mask, reusable with `forget --mask FILE`.
    Under `accelerate launch` the Fisher / saliency batches are split over the processes (each on its own GPU
    when on CUDA) and the mask is the one-process mask; the main process writes it."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # PartialState, unlike Accelerator, does not read ACCELERATE_USE_CPU: without cpu=True it runs ONE process
    processes = PartialState(cpu=resolve_device(cfg.device) == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU"))
    device = str(processes.device) if processes.num_processes > 1 else resolve_device(cfg.device)  # cuda:<rank>
    loaded, dataset = load_model_and_data(cfg.model, cfg.dataset, cfg.data_root, cfg.forget_class, device)
    forget_set, retain_set = forget_retain_split(dataset, cfg.forget_class)
    result = compute_mask(loaded.backbone(), forget_set, retain_set, cfg.mask, cfg.kind, cfg.seed, processes)
    if processes.is_main_process:
        made = mask_description(cfg.mask, cfg.kind, cfg.forget_class)
        save_mask(cfg.out, result, {**made, "model": str(cfg.model), "num_processes": processes.num_processes})
    processes.wait_for_everyone()
    return {"out": cfg.out, "density": mask_density(result), "num_processes": processes.num_processes}

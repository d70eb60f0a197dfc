"""`diffusion-unlearn relearn`: how hard is it to bring a forgotten class back (docs/stopping-and-relearning.md)?

Per variant K of `shots`: a fresh copy of the model is fine-tuned with the plain denoising loss (pretraining's
L_simple with CFG label dropout) on the retained-class images (K = 0) or on K images of the forgotten class (a
seeded choice; the K images of a smaller K are among those of a larger one), for N = `max_steps` steps. At step 0,
every `probe_every` steps and at N the weights draw `probe_samples` forgotten-class images (the same per-index
seeds each time) and the probe measures `fa` and `fa_in_distribution` (eval/ood.py). "Steps to relearn" is the
first probed step with fa_in_distribution ≥ `relearned_at`, or None ("not within N").

Each variant writes `k<K>/state.pt` every `checkpoint_every` steps (weights, optimizer, batch stream, RNG, curve,
provenance) and `k<K>/result.json` when done: a killed run resumes to the same result, bitwise.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from diffusion_unlearn.config import RelearnConfig, config_to_dict, resolve_device
from diffusion_unlearn.data import BatchStream, ImageDataset, forget_retain_split
from diffusion_unlearn.eval.classifier import FAClassifier, check_classifier_classes, load_classifier
from diffusion_unlearn.eval.ood import OODCalibration, calibration_for, calibration_sets, sampled_forgetting
from diffusion_unlearn.eval.report import save_figure
from diffusion_unlearn.fileio import UserError, atomic_path, read_json, torch_save_atomic, write_json
from diffusion_unlearn.modelfolder import load_model_and_data, load_model_folder
from diffusion_unlearn.optim import OptimizerSpec
from diffusion_unlearn.parameters import trainable_parameters
from diffusion_unlearn.pipelines.sampling import Pipeline
from diffusion_unlearn.preflight import check_writable_dir
from diffusion_unlearn.provenance import (Provenance, check_reuse, model_files_identity, settings_of, state_record,
                                         weights_fingerprint)
from diffusion_unlearn.sampler_defaults import resolve_sampler

StepCallback = Callable[[int, int], None]  # (K, step done), after each optimizer step
ProbeMeasure = Callable[[Pipeline], dict]  # a pipeline → {"fa", "fa_in_distribution", "ood_rate"}
RESULT, PLOT, SECTION = "relearn.json", "relearn.png", "relearn.md"


def parse_shots(spec: str) -> list[int]:
    """'0,1,5,25' → [0, 1, 5, 25] (0: retained-class data only)."""
    try:
        shots = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"cannot read shots {spec!r}; pass counts of forgotten-class images, e.g. 0,1,5,25") from None
    if not shots or any(k < 0 for k in shots) or len(set(shots)) != len(shots):
        raise UserError(f"shots {spec!r}: give distinct counts ≥ 0 (0: retained-class data only), e.g. 0,1,5,25")
    return shots


def relearn_probe(clf: FAClassifier, cal: OODCalibration, forget_class: int, samples: int, sampler) -> ProbeMeasure:
    """fa, fa_in_distribution and ood_rate of `samples` forgotten-class images (the same seeds at every probe)."""

    def measure(pipeline: Pipeline) -> dict:
        return sampled_forgetting(pipeline, clf, cal, forget_class, samples, sampler)[0]

    return measure


def steps_to_relearn(curve: list[dict], threshold: float) -> int | None:
    """The first probed step with fa_in_distribution ≥ threshold, or None (not within the run)."""
    return next((p["step"] for p in curve if p["fa_in_distribution"] >= threshold), None)


def variant_record(cfg: RelearnConfig, shots: int) -> Provenance:
    """What a variant's state and result were made with: the run's settings (its other variants aside), this K
    and the model's weight files."""
    settings = {k: v for k, v in settings_of(cfg).items() if k != "shots"}
    return Provenance("relearn-variant", {**settings, "k": shots, "model_files": model_files_identity(cfg.model)})


def training_set(forget_set: ImageDataset, retain_set: ImageDataset, shots: int, seed: int) -> ImageDataset:
    """The retained images (K = 0), else the first K of a seeded permutation of the forgotten-class images."""
    if shots == 0:
        return retain_set
    if shots > len(forget_set):
        raise UserError(f"shots {shots}: the forgotten class has only {len(forget_set)} training images; "
                        "pass smaller --shots")
    order = torch.randperm(len(forget_set), generator=torch.Generator().manual_seed(seed))  # (N_f,)
    return forget_set.subset(order[:shots])


def run_variant(cfg: RelearnConfig, shots: int, data: ImageDataset, measure: ProbeMeasure, folder: Path,
                device: str, callback: StepCallback | None = None) -> dict:
    """Fine-tune a fresh copy of the model on `data` for `cfg.max_steps` steps, probing as it goes; resumable."""
    record = variant_record(cfg, shots)
    if (folder / "result.json").is_file():
        result = read_json(folder / "result.json")
        check_reuse(Provenance.from_dict(result.get("provenance")), record, folder / "result.json")
        return result
    state_path = folder / "state.pt"
    if state_path.is_file():
        check_reuse(state_record(state_path), record, state_path, check_version=True)
    folder.mkdir(parents=True, exist_ok=True)
    loaded = load_model_folder(cfg.model, device)
    backbone, denoiser = loaded.backbone(), loaded.denoiser
    params = trainable_parameters(denoiser)
    opt = OptimizerSpec(cfg.optimizer, cfg.lr).build(params)
    stream = BatchStream(data, cfg.batch_size, seed=cfg.seed * 1000 + shots)
    torch.manual_seed(cfg.seed)
    step, curve = 0, []
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        denoiser.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        stream.load_state_dict(state["stream"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        step, curve = state["step"], state["curve"]
        print(f"relearn: resuming K={shots} in {folder} from step {step} of {cfg.max_steps}", file=sys.stderr)

    def probe() -> None:
        denoiser.eval()
        with torch.random.fork_rng(devices=[]):
            curve.append({"step": step, **measure(loaded.pipeline)})

    def save() -> None:
        rng = {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state_all()}
                                                   if torch.cuda.is_available() else {})}
        torch_save_atomic({"provenance": record.to_dict(), "step": step, "model": denoiser.state_dict(),
                           "optim": opt.state_dict(), "stream": stream.state_dict(), "rng": rng, "curve": curve},
                          state_path)

    if step == 0 and not curve:
        probe()  # the model as given
    while step < cfg.max_steps:
        denoiser.train()
        x, y = stream.next()
        loss = backbone.per_sample_loss(x.to(device), y.to(device), cfg_dropout=cfg.cfg_dropout).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        step += 1
        if step % cfg.probe_every == 0 or step == cfg.max_steps:
            probe()
        if step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            save()
        callback and callback(shots, step)
    found = steps_to_relearn(curve, cfg.relearned_at)
    result = {"shots": shots, "data": "retained classes" if shots == 0 else f"{shots} forgotten-class images",
              "steps_to_relearn": found, "relearned": found is not None, "curve": curve,
              "weights_sha256": weights_fingerprint(denoiser.state_dict()), "provenance": record.to_dict()}
    write_json(folder / "result.json", result)
    state_path.unlink(missing_ok=True)
    return result


def relearn(cfg: RelearnConfig, callback: StepCallback | None = None) -> dict:
    """Every variant of `cfg.shots`, then relearn.json, relearn.png and relearn.md in `cfg.out`."""
    started = time.perf_counter()
    shots = parse_shots(cfg.shots)
    if not cfg.classifier:
        raise UserError("relearn needs --classifier FOLDER (the FA classifier; train one with "
                        "`diffusion-unlearn train-classifier`)")
    out = Path(cfg.out)
    check_writable_dir(out, "--out")
    device = resolve_device(cfg.device)
    clf = load_classifier(cfg.classifier, device)
    loaded, dataset = load_model_and_data(cfg.model, cfg.dataset, cfg.data_root, cfg.forget_class, device)
    check_classifier_classes(clf, loaded.meta.class_names)
    forget_set, retain_set = forget_retain_split(dataset, cfg.forget_class)
    datasets = {k: training_set(forget_set, retain_set, k, cfg.seed) for k in shots}  # checks every K first
    if cfg.restart:
        import shutil

        for k in shots:
            shutil.rmtree(out / f"k{k}", ignore_errors=True)
    sampler = resolve_sampler(cfg.sampler, loaded.meta.backbone, "eval", device)
    cfg = replace(cfg, sampler=sampler)
    measure = relearn_probe(clf, calibration_for(clf, *calibration_sets(clf, dataset)), cfg.forget_class,
                            cfg.probe_samples, sampler)
    variants = [run_variant(cfg, k, datasets[k], measure, out / f"k{k}", device, callback) for k in shots]
    result = {"model": str(cfg.model), "forget_class": cfg.forget_class,
              "forget_class_name": loaded.meta.class_names[cfg.forget_class], "steps": cfg.max_steps, "lr": cfg.lr,
              "batch_size": cfg.batch_size, "relearned_at": cfg.relearned_at, "probe_samples": cfg.probe_samples,
              "classifier": str(cfg.classifier), **sampler.describe(), "variants": variants,
              "seconds": time.perf_counter() - started, "config": config_to_dict(cfg)}
    write_json(out / RESULT, result)
    relearn_plot(result, out / PLOT)
    with atomic_path(out / SECTION) as tmp:
        tmp.write_text(markdown_section(result, PLOT))
    return {**result, "json": str(out / RESULT), "plot": str(out / PLOT), "markdown": str(out / SECTION)}


def _steps(found: int | None, steps: int) -> str:
    return f"not within {steps}" if found is None else str(found)


def markdown_section(result: dict, plot: str) -> str:
    """The report's "Relearning" section: steps to relearn per variant and the curve plot."""
    rows = [f"| {v['data']} | {_steps(v['steps_to_relearn'], result['steps'])} | "
            f"{100 * v['curve'][-1]['fa']:.1f} % | {100 * v['curve'][-1]['fa_in_distribution']:.1f} % |"
            for v in result["variants"]]
    return "\n".join([
        "## Relearning", "",
        f"Model `{result['model']}`, forgotten class **{result['forget_class_name']}**: fine-tuned with the plain "
        f"denoising loss for up to {result['steps']} steps (lr {result['lr']:g}, batch {result['batch_size']}); "
        f"relearned at the first probe with fa_in_distribution ≥ {result['relearned_at']} "
        f"({result['probe_samples']} samples per probe).", "",
        "| fine-tuned on | steps to relearn | FA at the end | FA in distribution at the end |", "|---|---|---|---|",
        *rows, "", f"![relearning curves]({plot})", ""])


def relearn_plot(result: dict, out_png: Path) -> None:
    """fa_in_distribution (solid) and fa (dashed) over the steps, one colour per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, v in enumerate(result["variants"]):
        steps = [p["step"] for p in v["curve"]]
        ax.plot(steps, [p["fa_in_distribution"] for p in v["curve"]], color=f"C{i}", label=v["data"])
        ax.plot(steps, [p["fa"] for p in v["curve"]], color=f"C{i}", ls="--", lw=0.8)
    ax.axhline(result["relearned_at"], color="grey", lw=0.6)
    ax.set(xlabel="fine-tuning step", ylabel="FA in distribution (— ) / FA (- -)", ylim=(-0.02, 1.02),
           title=f"relearning class {result['forget_class_name']}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(fig, out_png)

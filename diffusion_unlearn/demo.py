"""`demo`: the whole path on the embedded digits, on a fresh machine, in minutes.

base model (cached) → FA classifier (cached) → eval base → SFRon + DualOptim → eval unlearned → report.
`--backbone dit` runs it on a latent DiT: a small VAE and the DiT on its latents are the base model.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from diffusion_unlearn.config import (DemoConfig, EvalConfig, ForgetConfig, PretrainConfig, SamplerConfig,
                                      build_config, preset_path, yaml_values)
from diffusion_unlearn.eval.classifier import ClassifierConfig, load_classifier, train_classifier
from diffusion_unlearn.eval.evaluate import evaluate
from diffusion_unlearn.eval.report import loss_plot, write_report
from diffusion_unlearn.fileio import UserError
from diffusion_unlearn.modelfolder import read_model_meta
from diffusion_unlearn.pretrain import pretrain
from diffusion_unlearn.provenance import Provenance, check_reuse
from diffusion_unlearn.unlearn import OutputPaths, forget, run_record

# Fast sampler and sample counts for the demo's evaluations, and the sampler of its before/after grids (the
# pictures come from the sampler the numbers do), so the whole demo fits in ~3 minutes on 2 CPU cores (the paper
# protocol uses 1000 steps and 500/5000 samples; see README).
DEMO_SAMPLER = SamplerConfig(sampler="ddim", steps=25, eta=0.0, guidance_scale=3.0)
DEMO_FA_SAMPLES, DEMO_RETAIN_PER_CLASS = 250, 100


@dataclass(frozen=True)
class DemoRecipe:
    pretrain_preset: str  # how the base model trains
    forget_preset: str  # how it unlearns
    base_name: str  # the base model's folder under the cache dir (+ "-seed{seed}")
    model: str  # what the report calls the model


RECIPES = {
    "ddpm": DemoRecipe("digits-pretrain", "digits-sfron", "digits-base", "DDPM U-Net"),
    "dit": DemoRecipe("digits-dit-pretrain", "digits-dit-sfron", "digits-dit-base", "latent DiT"),
}


def demo(cfg: DemoConfig) -> dict:
    started = time.perf_counter()
    if not 0 <= cfg.forget_class < 10:
        raise UserError(f"--forget-class {cfg.forget_class} is outside the digits classes 0..9")
    recipe = RECIPES[cfg.backbone]
    cache, out = Path(cfg.cache_dir), Path(cfg.out)
    base = cache / f"{recipe.base_name}-seed{cfg.seed}"
    pretrain(build_config(PretrainConfig, yaml_values(PretrainConfig, preset_path(recipe.pretrain_preset)),
                          {"out": str(base), "seed": cfg.seed, "cache_dir": str(cache)}),
             reuse_hint=f"the demo trains its base model anew only where none is cached: delete {base} or pass "
                        "another --cache-dir")
    classifier = cache / "digits-classifier"
    try:
        load_classifier(classifier)
    except UserError:
        train_classifier(ClassifierConfig(dataset="digits", out=str(classifier)))

    common = dict(dataset="digits", forget_class=cfg.forget_class, classifier=str(classifier),
                  cache_dir=str(cache / "fid"), sampler=DEMO_SAMPLER, fa_samples=DEMO_FA_SAMPLES,
                  retain_samples_per_class=DEMO_RETAIN_PER_CLASS)
    # each setting's metrics (and sample store) in a file of its own: a store is reused only by its own setting
    base_metrics = out / f"metrics-base-{cfg.backbone}-class{cfg.forget_class}-seed{cfg.seed}.json"
    metrics_base = evaluate(EvalConfig(model=str(base), out=str(base_metrics), **common))
    run = out / f"forget-{cfg.backbone}-class{cfg.forget_class}-{cfg.optim}-seed{cfg.seed}"  # reused when finished
    forget_cfg = build_config(ForgetConfig, yaml_values(ForgetConfig, preset_path(recipe.forget_preset)),
                              {"model": str(base), "forget_class": cfg.forget_class, "optim": cfg.optim,
                               "out": str(run), "seed": cfg.seed, "cache_dir": str(cache),
                               "sampler": asdict(DEMO_SAMPLER)})
    paths = OutputPaths(Path(forget_cfg.out))
    if not finished_run_reusable(paths, forget_cfg, base):
        forget(forget_cfg)
    metrics_unlearned = evaluate(EvalConfig(model=str(paths.model), out=str(run / "metrics.json"), **common))

    loss_plot(paths.log, out / "losses.png")
    report = write_report(
        out / "report.md", title=f"SFRon + {'DualOptim' if cfg.optim == 'dual' else 'shared optimizer'} on digits "
                                 f"({recipe.model})",
        base=metrics_base, unlearned=metrics_unlearned, grid_before=paths.grid_before, grid_after=paths.grid_after,
        loss_png=out / "losses.png",
        notes=[f"base model: {base}", f"classifier: {classifier} (test accuracy "
               f"{metrics_base['classifier_test_accuracy']:.3f})", f"unlearning run: {paths.root}",
               f"total demo time: {time.perf_counter() - started:.0f} s"])
    return {"report": str(report), "fa_base": metrics_base["fa"], "fa_unlearned": metrics_unlearned["fa"],
            "retain_accuracy_base": metrics_base["retain_accuracy"],
            "retain_accuracy_unlearned": metrics_unlearned["retain_accuracy"],
            "fid_base": metrics_base["fid"], "fid_unlearned": metrics_unlearned["fid"],
            "seconds": time.perf_counter() - started}


def finished_run_reusable(paths: OutputPaths, cfg: ForgetConfig, base: Path) -> bool:
    """Whether `paths` holds a finished `forget` run made from this base model with these settings (reused, not
    rerun); a finished run made otherwise is refused in one line, never overwritten."""
    if not paths.model.exists() or paths.state.exists():
        return False
    hint = f"the demo reuses only a run made as it would make it: delete {paths.root} or pass another --out"
    history = read_model_meta(paths.model).history
    made = history[-1].get("provenance") if history else None
    check_reuse(Provenance.from_dict(made), run_record(cfg), paths.model, hint)
    if history[:-1] != read_model_meta(base).history:
        raise UserError(f"{paths.model} was unlearned from another base model than {base}; {hint}")
    return True

"""`demo`: the whole path on the embedded digits, on a fresh machine, in minutes.

base model (cached) → FA classifier (cached) → eval base → SFRon + DualOptim → eval unlearned → report.
"""

from __future__ import annotations

import time
from pathlib import Path

from diffusion_unlearn.config import (DemoConfig, EvalConfig, ForgetConfig, PretrainConfig, SamplerConfig,
                                      build_config, load_yaml, preset_path)
from diffusion_unlearn.eval.classifier import ClassifierConfig, load_classifier, train_classifier
from diffusion_unlearn.eval.evaluate import evaluate
from diffusion_unlearn.eval.report import loss_plot, write_report
from diffusion_unlearn.fileio import UserError
from diffusion_unlearn.pretrain import pretrain
from diffusion_unlearn.unlearn import OutputPaths, forget

# Fast sampler and sample counts for the demo's evaluations, so the whole demo fits in ~7 minutes on
# 2 CPU cores (the paper protocol uses 1000 steps and 500/5000 samples; see README).
DEMO_SAMPLER = SamplerConfig(sampler="ddim", steps=25, eta=0.0, guidance_scale=3.0)
DEMO_FA_SAMPLES, DEMO_RETAIN_PER_CLASS = 250, 100


def demo(cfg: DemoConfig) -> dict:
    started = time.perf_counter()
    if not 0 <= cfg.forget_class < 10:
        raise UserError(f"--forget-class {cfg.forget_class} is outside the digits classes 0..9")
    cache, out = Path(cfg.cache_dir), Path(cfg.out)
    base = cache / f"digits-base-seed{cfg.seed}"
    pretrain(build_config(PretrainConfig, {**load_yaml(preset_path("digits-pretrain")), "out": str(base),
                                           "seed": cfg.seed}))
    classifier = cache / "digits-classifier"
    try:
        load_classifier(classifier)
    except UserError:
        train_classifier(ClassifierConfig(dataset="digits", out=str(classifier)))

    common = dict(dataset="digits", forget_class=cfg.forget_class, classifier=str(classifier),
                  cache_dir=str(cache / "fid"), sampler=DEMO_SAMPLER, fa_samples=DEMO_FA_SAMPLES,
                  retain_samples_per_class=DEMO_RETAIN_PER_CLASS)
    metrics_base = evaluate(EvalConfig(model=str(base), out=str(out / "metrics-base.json"), **common))
    forget_cfg = build_config(ForgetConfig, {**load_yaml(preset_path("digits-sfron")), "model": str(base),
                                             "forget_class": cfg.forget_class, "optim": cfg.optim,
                                             "out": str(out / "forget"), "seed": cfg.seed})
    forget_cfg.sampler = DEMO_SAMPLER
    paths = OutputPaths(Path(forget_cfg.out))
    if not paths.model.exists() or paths.state.exists():
        forget(forget_cfg)
    metrics_unlearned = evaluate(EvalConfig(model=str(paths.model), out=str(out / "metrics-unlearned.json"), **common))

    loss_plot(paths.log, out / "losses.png")
    report = write_report(
        out / "report.md", title=f"SFRon + {'DualOptim' if cfg.optim == 'dual' else 'shared optimizer'} on digits",
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

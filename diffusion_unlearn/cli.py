"""`diffusion-unlearn` (also `python -m diffusion_unlearn`): each subcommand wraps one Python function whose
typed config it builds from `--preset`/`--config` YAML and flags."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from diffusion_unlearn.config import (ConvertConfig, DemoConfig, EvalConfig, FidStatsConfig, ForgetConfig, MaskConfig,
                                      PretrainConfig, RelearnConfig, SampleConfig, StudyConfig, add_config_arguments,
                                      config_from_args)
from diffusion_unlearn.fileio import UserError


def _commands() -> dict[str, tuple[type, Callable, str]]:
    # Imported lazily so `--help` stays fast.
    from diffusion_unlearn.convert import convert
    from diffusion_unlearn.demo import demo
    from diffusion_unlearn.eval.classifier import ClassifierConfig, train_classifier
    from diffusion_unlearn.eval.evaluate import evaluate
    from diffusion_unlearn.eval.fid_stats import fid_stats
    from diffusion_unlearn.eval.import_classifier import ImportClassifierConfig, import_classifier
    from diffusion_unlearn.methods import MethodsConfig, list_methods
    from diffusion_unlearn.pretrain import pretrain
    from diffusion_unlearn.relearn import relearn
    from diffusion_unlearn.sample import sample
    from diffusion_unlearn.study import study
    from diffusion_unlearn.unlearn import forget, mask

    return {
        "pretrain": (PretrainConfig, pretrain, "train a base model (or the retrain baseline with --exclude-class)"),
        "train-classifier": (ClassifierConfig, train_classifier, "train the FA classifier"),
        "import-classifier": (ImportClassifierConfig, import_classifier,
                              "an ImageNet classifier's local weights (torchvision/timm) → an FA classifier folder"),
        "mask": (MaskConfig, mask, "SFRon Fisher-ratio saliency mask"),
        "forget": (ForgetConfig, forget, "unlearn one class (SFRon + DualOptim by default)"),
        "methods": (MethodsConfig, list_methods, "list the forget methods, their papers and presets"),
        "sample": (SampleConfig, sample, "labelled sample grids, PNG folders and .npz sample batches"),
        "eval": (EvalConfig, evaluate, "FA, retained accuracy and FID"),
        "fid-stats": (FidStatsConfig, fid_stats, "FID reference statistics of a dataset → .npz (mu, sigma, record)"),
        "convert": (ConvertConfig, convert, "import the lineage's ckpt.pth or a DiT (→ model folder), mask/Fisher .pt files; "
                    "export DiT folders"),
        "study": (StudyConfig, study, "stability study: methods × optimizer setups × classes × seeds → table, "
                  "CSV, FA/FID curves"),
        "relearn": (RelearnConfig, relearn, "fine-tune on retained data or K forgotten-class images: steps until the "
                    "class comes back"),
        "demo": (DemoConfig, demo, "the whole path on the embedded digits dataset"),
    }


def build_parser(commands: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusion-unlearn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=(cls.__doc__ or help_text).strip())
        add_config_arguments(p, cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    commands = _commands()
    args = build_parser(commands).parse_args(argv)
    cls, fn, _ = commands[args.command]
    try:
        result = fn(config_from_args(cls, args))
    except UserError as e:
        print(f"diffusion-unlearn {args.command}: error: {e}", file=sys.stderr)
        return 2
    if isinstance(result, dict):
        print(json.dumps({k: v for k, v in result.items() if k not in ("config", "losses")}, indent=2, default=str))
    elif result is not None:
        print(result)
    return 0

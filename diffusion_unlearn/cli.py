"""`diffusion-unlearn` (also `python -m diffusion_unlearn`): each subcommand wraps one Python function whose
typed config it builds from `--preset`/`--config` YAML and flags."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Callable

from diffusion_unlearn.config import (ClassifierConfig, ConvertConfig, DemoConfig, EvalConfig, FidStatsConfig,
                                      ForgetConfig, ImportClassifierConfig, MaskConfig, MethodsConfig, PretrainConfig,
                                      RelearnConfig, SampleConfig, StudyConfig, add_config_arguments, config_from_args)
from diffusion_unlearn.errors import UserError


def _commands() -> dict[str, tuple[type, str, str]]:
    """name → (config class, "module:function" it runs, help). The function's module is imported only when its
    command runs, so `--help` and the parser import no torch, diffusers or accelerate."""
    return {
        "pretrain": (PretrainConfig, "diffusion_unlearn.pretrain:pretrain",
                     "train a base model (or the retrain baseline with --exclude-class)"),
        "train-classifier": (ClassifierConfig, "diffusion_unlearn.eval.classifier:train_classifier",
                             "train the FA classifier"),
        "import-classifier": (ImportClassifierConfig, "diffusion_unlearn.eval.import_classifier:import_classifier",
                              "an ImageNet classifier's local weights (torchvision/timm) → an FA classifier folder"),
        "mask": (MaskConfig, "diffusion_unlearn.unlearn:mask", "SFRon Fisher-ratio saliency mask"),
        "forget": (ForgetConfig, "diffusion_unlearn.unlearn:forget",
                   "unlearn one class (SFRon + DualOptim by default)"),
        "methods": (MethodsConfig, "diffusion_unlearn.methods:list_methods",
                    "list the forget methods, their papers and presets"),
        "sample": (SampleConfig, "diffusion_unlearn.sample:sample",
                   "labelled sample grids, PNG folders and .npz sample batches"),
        "eval": (EvalConfig, "diffusion_unlearn.eval.evaluate:evaluate",
                 "FA, FA in distribution, retained accuracy, FID and the evaluator's metric set"),
        "fid-stats": (FidStatsConfig, "diffusion_unlearn.eval.fid_stats:fid_stats",
                      "FID reference statistics of a dataset → .npz (mu, sigma, record)"),
        "convert": (ConvertConfig, "diffusion_unlearn.convert:convert",
                    "import the lineage's ckpt.pth or a DiT (→ model folder), mask/Fisher .pt files; "
                    "export DiT folders"),
        "study": (StudyConfig, "diffusion_unlearn.study:study",
                  "stability study: methods × optimizer setups × classes × seeds → table, CSV, FA/FID curves"),
        "relearn": (RelearnConfig, "diffusion_unlearn.relearn:relearn",
                    "fine-tune on retained data or K forgotten-class images: steps until the class comes back"),
        "demo": (DemoConfig, "diffusion_unlearn.demo:demo", "the whole path on the embedded digits dataset"),
    }


def command_function(target: str) -> Callable:
    """The function a command runs, from its "module:function" (imports the module)."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def build_parser(commands: dict, only: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; with `only`, only that subcommand gets its option flags (the others keep their name
    and help), so parsing one command never builds the flags of all (`forget`'s need the method registry)."""
    parser = argparse.ArgumentParser(prog="diffusion-unlearn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=(cls.__doc__ or help_text).strip())
        if only is None or name == only:
            add_config_arguments(p, cls)
    return parser


def _close_process_group() -> None:
    """Under `accelerate launch`, tear the process group down while the interpreter is whole: left to the
    interpreter's exit, gloo's destructor can abort a process whose peer has already gone (seen as SIGABRT)."""
    torch = sys.modules.get("torch")  # never import torch just for this
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = _commands()
    chosen = argv[0] if argv and argv[0] in commands else ""
    args = build_parser(commands, only=chosen).parse_args(argv)
    cls, target, _ = commands[args.command]
    try:
        result = command_function(target)(config_from_args(cls, args))
    except UserError as e:
        print(f"diffusion-unlearn {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        _close_process_group()
    if isinstance(result, dict):
        print(json.dumps({k: v for k, v in result.items() if k not in ("config", "losses")}, indent=2, default=str))
    elif result is not None:
        print(result)
    return 0

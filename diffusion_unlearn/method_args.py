"""The forget methods' own arguments (`ForgetConfig.method_args`) as torch-free dataclasses.

`forget`'s command line lists every method's arguments and a ForgetConfig checks its `method_args`, so neither
may import the methods (they import torch). Each built-in method's class (`methods/`) subclasses its arguments
class here, which holds its name and fields; `BUILTIN_METHOD_ARGS` lists them in the registry's order. Once
`diffusion_unlearn.methods` is loaded, its registry (which also holds methods registered at run time) is the
source instead (`config.method_argument_classes`). This module lives outside `methods/` because importing
anything in that package imports the methods.

Section numbers (§x.y) cite docs/reference-differences.md, which follows the published code section by section.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from pydantic import PositiveInt

from diffusion_unlearn.config import SamplerConfig, validate
from diffusion_unlearn.errors import UserError

RUN_FIELDS = ("forget_class", "sampler", "seed")  # method fields set from the run's config, not method_args


@dataclass
class MethodArgs:
    """The arguments every method takes."""

    name: ClassVar[str]

    retain_alpha: float = 1.0  # ρ
    cfg_dropout: float = 0.1  # label dropout in the retain loss, as pretraining
    cfg_dropout_in_forget_loss: bool = False  # reference quirk §7.6: ascend the null branch too

    @classmethod
    def arguments(cls) -> list[str]:
        """The method's own arguments: the keys of `method_args`."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in RUN_FIELDS]

    @classmethod
    def validate_args(cls, args: dict) -> dict:
        """`args` checked against the method's fields and completed with their defaults; else a UserError."""
        valid = cls.arguments()
        unknown = [k for k in args if k not in valid]
        if unknown:
            raise UserError(f"method_args.{unknown[0]}: method {cls.name!r} has no such argument; its arguments: "
                            f"{', '.join(valid)}")
        made = validate(cls, args, prefix="method_args.")
        return {k: getattr(made, k) for k in valid}


@dataclass
class SFRonArgs(MethodArgs):
    name = "sfron"
    adaptive_lambda: float = 0.5  # λ of adaptive gradient ascent


@dataclass
class SalUnArgs(MethodArgs):
    name = "salun"
    salun_label: Literal["next", "random"] = "next"  # pseudo label: (c+1) mod K (reference) or random c' ≠ c


@dataclass
class SelectiveAmnesiaArgs(MethodArgs):
    name = "sa"

    forget_class: int = 0
    ewc_lambda: float = 10.0  # EWC weight λ
    # which step's loss carries λ·EWC: the published joint step sums both; under `--schedule alternate` with
    # DualOptim, "forget" keeps the pull inside the forget optimizer's normalisation (docs/stopping-and-relearning.md)
    sa_ewc_step: Literal["retain", "forget"] = "retain"
    sa_samples_per_class: PositiveInt = 500  # replay: generated images per class (all feed the Fisher)
    sa_fisher_timesteps: PositiveInt = 1000  # Fisher: diffusion steps summed per sample (evenly spaced)
    sa_fisher_chunk: PositiveInt = 50  # Fisher: steps per forward pass
    sa_fisher_as_reference: bool = False  # reference quirk (§2.3): Fisher on [0, 1] images, 10 % label dropout
    sa_fisher: str | None = None  # an imported Fisher (`convert --from lineage-sa-fisher`) instead of computing one
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    seed: int = 0


@dataclass
class GradientAscentArgs(MethodArgs):
    name = "ga"


@dataclass
class RandomLabelArgs(MethodArgs):
    name = "rl"


@dataclass
class FineTuneArgs(MethodArgs):
    name = "ft"


# name → arguments class of each built-in method, in the order methods/__init__.py registers them (a test checks)
BUILTIN_METHOD_ARGS: dict[str, type[MethodArgs]] = {cls.name: cls for cls in (
    SFRonArgs, SalUnArgs, SelectiveAmnesiaArgs, GradientAscentArgs, RandomLabelArgs, FineTuneArgs)}

"""Forget methods. Each is a small dataclass (methods.base.Method) with `forget_loss`, `retain_loss`, `mask_kind`,
`mask_retain`, what it supports and shares, and an optional `prepare`; it sees only the backbone adapter, so it runs
on any backbone with any optimizer setup. `register_method` adds one. A method's paper values are its presets:
the files in `configs/` naming it (`method:`)."""

from __future__ import annotations

import dataclasses

from diffusion_unlearn.config import (CONFIG_DIR, ForgetConfig, MaskSettings, MethodsConfig, build_config,
                                      forget_registry_caches, load_yaml, option_values,
                                      yaml_values)
from diffusion_unlearn.methods.base import Method
from diffusion_unlearn.methods.baselines import FineTune, GradientAscent, RandomLabel
from diffusion_unlearn.methods.sa import SelectiveAmnesia
from diffusion_unlearn.methods.salun import SalUn
from diffusion_unlearn.methods.sfron import SFRon
from diffusion_unlearn.registries import register

METHODS: dict[str, type[Method]] = {}  # name → method class, in registration order


def register_method(cls: type[Method]) -> type[Method]:
    """Add `cls` to the methods under `cls.name` (usable as a class decorator); a name is registered once."""
    register(METHODS, cls, "method")
    forget_registry_caches()
    return cls


for _method in (SFRon, SalUn, SelectiveAmnesia, GradientAscent, RandomLabel, FineTune):
    register_method(_method)


def build_method(cfg: ForgetConfig) -> Method:
    """The method named by `cfg.method`, configured from a ForgetConfig."""
    return METHODS[cfg.method].from_config(cfg)


SHARED_FIELDS = {f.name for f in dataclasses.fields(Method)}  # every method's arguments: not listed per method
MASK_RULES = {"fisher-ratio": "gamma", "topk": "topk_fraction"}


def _settings(values: dict, keys) -> str:
    return " ".join(f"{k}={values[k]}" for k in keys)


def _preset_changes(path, method: str) -> str:
    """The settings a preset changes from the ForgetConfig defaults of its method."""
    defaults = option_values(build_config(ForgetConfig, {"method": method}))
    preset = option_values(build_config(ForgetConfig, yaml_values(ForgetConfig, path)))
    return _settings(preset, [k for k, v in preset.items() if v != defaults[k] and k != "method"]) or "the defaults"


def list_methods(cfg: MethodsConfig) -> str:
    """The `methods` subcommand: one Markdown table row per method and preset."""
    mask_defaults = dataclasses.asdict(MaskSettings())
    presets = sorted(CONFIG_DIR.glob("*.yaml"))
    rows = ["| method | paper | mask | forget loss | its settings (defaults) | preset: changes to the defaults |",
            "|---|---|---|---|---|---|"]
    for name, method in METHODS.items():
        defaults = {**method.validate_args({}), **mask_defaults}
        own = [name for name in method.arguments() if name not in SHARED_FIELDS]
        if method.mask_kind:
            own.append(MASK_RULES[method.mask_kind])
        mask = f"{method.mask_kind}{', retain grads too' if method.mask_retain else ''}" if method.mask_kind else "none"
        loss = method.forget_loss.__doc__.splitlines()[0] if method.forget_loss else "none (retain steps only)"
        mine = [p for p in presets if load_yaml(p).get("method") == name]
        changes = [f"{p.stem}: {_preset_changes(p, name)}" for p in mine] or ["none"]
        rows += [f"| {name} | {method.paper} | {mask} | {loss} | {_settings(defaults, own) or '–'} | {c} |"
                 for c in changes]
    return "\n".join(rows)

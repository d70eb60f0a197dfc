"""Forget methods. Each is a small object with `forget_loss`, `retain_loss`, `mask_kind`, `mask_retain`;
it sees only the backbone adapter, so it runs on any backbone with any optimizer setup."""

from __future__ import annotations

from diffusion_unlearn.methods.sfron import SFRon

METHODS = {"sfron": SFRon}


def build_method(cfg) -> SFRon:
    """The method named by `cfg.method`, configured from a ForgetConfig."""
    if cfg.method == "sfron":
        return SFRon(adaptive_lambda=cfg.adaptive_lambda, retain_alpha=cfg.retain_alpha,
                     cfg_dropout=cfg.cfg_dropout, cfg_dropout_in_forget_loss=cfg.cfg_dropout_in_forget_loss)
    raise KeyError(cfg.method)

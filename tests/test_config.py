"""One typed config for CLI and API: flags, YAML presets, precedence, round trip of the resolved config."""

import argparse

import pytest

from diffusion_unlearn.config import (ForgetConfig, SamplerConfig, add_config_arguments, build_config,
                                      config_from_args, config_to_dict, load_yaml, write_config_yaml)
from diffusion_unlearn.fileio import UserError


def _parse(argv, cls=ForgetConfig):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, cls)
    return config_from_args(cls, parser.parse_args(argv))


def test_flags_types_and_nested_sampler():
    cfg = _parse(["--forget-class", "7", "--forget-lr", "3e-5", "--no-clip-retain", "--forget-betas", "0.8", "0.99",
                  "--steps", "12", "--guidance-w", "2", "--mask", "m.safetensors"])
    assert cfg.forget_class == 7 and cfg.forget_lr == 3e-5 and cfg.clip_retain is False
    assert cfg.forget_betas == (0.8, 0.99) and cfg.mask == "m.safetensors"
    assert isinstance(cfg.sampler, SamplerConfig) and cfg.sampler.steps == 12 and cfg.sampler.guidance_scale == 3.0
    assert _parse([]) == ForgetConfig()


def test_yaml_then_flags_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("forget_lr: 5.0e-5\niterations: 20\nsampler: {steps: 7}\n_source: ignored note\n")
    cfg = _parse(["--config", str(path), "--iterations", "30"])
    assert cfg.forget_lr == 5e-5 and cfg.iterations == 30 and cfg.sampler.steps == 7


def test_unknown_and_bad_values_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown option 'forget_rate'"):
        build_config(ForgetConfig, {"forget_rate": 1})
    with pytest.raises(UserError, match="must be one of"):
        build_config(ForgetConfig, {"optim": "triple"})
    with pytest.raises(UserError, match="expects int"):
        build_config(ForgetConfig, {"iterations": "many"})
    with pytest.raises(UserError, match="unknown preset"):
        _parse(["--preset", "no-such-preset"])


def test_resolved_config_yaml_round_trips(tmp_path):
    cfg = build_config(ForgetConfig, {"forget_class": 2, "mask": None, "retain_betas": [0.5, 0.6], "sampler": {"eta": 1.0}})
    write_config_yaml(cfg, tmp_path / "config.yaml")
    again = build_config(ForgetConfig, load_yaml(tmp_path / "config.yaml"))
    assert again == cfg and config_to_dict(again)["sampler"]["eta"] == 1.0


def test_digits_presets_load():
    from diffusion_unlearn.config import PretrainConfig, preset_path

    assert build_config(PretrainConfig, load_yaml(preset_path("digits-pretrain"))).model_preset == "digits"
    sfron = build_config(ForgetConfig, load_yaml(preset_path("digits-sfron")))
    assert (sfron.method, sfron.optim, sfron.gamma, sfron.adaptive_lambda) == ("sfron", "dual", 3.0, 0.5)

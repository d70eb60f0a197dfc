"""One typed config per command for CLI, YAML and API: nested sections, flat aliases, strict one-line errors,
precedence, round trip of the resolved config, every preset and every README command."""

import argparse
import math
import re
import shlex
from pathlib import Path

import pytest

from diffusion_unlearn.cli import _commands, build_parser
from diffusion_unlearn.config import (CONFIG_DIR, EvalConfig, ForgetConfig, MaskConfig, PretrainConfig, SampleConfig,
                                      SamplerConfig, StudyConfig, add_config_arguments, build_config, config_from_args,
                                      config_to_dict, load_yaml, option_values, write_config_yaml, yaml_values)
from diffusion_unlearn.fileio import UserError

README = Path(__file__).resolve().parents[1] / "README.md"


def _parse(argv, cls=ForgetConfig):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, cls)
    return config_from_args(cls, parser.parse_args(argv))


def _error(values, cls=ForgetConfig) -> str:
    with pytest.raises(UserError) as info:
        build_config(cls, values)
    return str(info.value)


def test_flat_flags_reach_their_sections():
    cfg = _parse(["--forget-class", "7", "--forget-lr", "3e-5", "--no-clip-retain", "--forget-betas", "0.8", "0.99",
                  "--steps", "12", "--guidance-w", "2", "--mask", "m.safetensors", "--gamma", "2.5",
                  "--adaptive-lambda", "0.25", "--sample-seed", "4", "--seed", "9"])
    assert cfg.forget_class == 7 and cfg.forget_optimizer.lr == 3e-5 and cfg.clip_retain is False
    assert cfg.forget_optimizer.betas == (0.8, 0.99) and cfg.retain_optimizer.betas == (0.9, 0.999)
    assert cfg.mask.file == "m.safetensors" and cfg.mask.gamma == 2.5
    assert cfg.method_args["adaptive_lambda"] == 0.25
    assert isinstance(cfg.sampler, SamplerConfig) and cfg.sampler.steps == 12 and cfg.sampler.guidance_scale == 3.0
    assert (cfg.seed, cfg.sampler.sample_seed) == (9, 4)  # run seed and sampler seed are two settings
    assert _parse([]) == ForgetConfig()


def test_dotted_flags_and_both_sides_aliases():
    cfg = _parse(["--sampler.steps", "5", "--retain-optimizer.lr", "0.5", "--betas", "0.1", "0.2",
                  "--forget-betas", "0.3", "0.4", "--momentum", "0.6", "--method", "sa", "--ewc-lambda", "3"])
    assert cfg.sampler.steps == 5 and cfg.retain_optimizer.lr == 0.5
    assert cfg.forget_optimizer.betas == (0.3, 0.4) and cfg.retain_optimizer.betas == (0.1, 0.2)  # own side wins
    assert cfg.forget_optimizer.momentum == cfg.retain_optimizer.momentum == 0.6
    assert cfg.method_args["ewc_lambda"] == 3.0 and cfg.method_args["sa_samples_per_class"] == 500


def test_yaml_then_flags_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("forget_lr: 5.0e-5\niterations: 20\nsampler: {steps: 7, eta: 0.5}\n_source: ignored note\n"
                    "mask: {gamma: 4}\n")
    cfg = _parse(["--config", str(path), "--iterations", "30", "--eta", "1"])
    assert cfg.forget_optimizer.lr == 5e-5 and cfg.iterations == 30
    assert (cfg.sampler.steps, cfg.sampler.eta, cfg.mask.gamma) == (7, 1.0, 4.0)  # merged field by field


def test_sections_do_not_leak_into_each_other():
    assert "unknown option 'sampler.seed'; did you mean 'sampler.sample_seed'?" == _error({"sampler": {"seed": 5}})
    assert _error({"sampler": {"forget_lr": 0.5}}).startswith("unknown option 'sampler.forget_lr'")
    assert _error({"sampler": {"foo": 1}}).startswith("unknown option 'sampler.foo'")
    assert build_config(ForgetConfig, {"sampler": {"sample_seed": 5}}).seed == 0


def test_unknown_keys_name_the_nearest_not_every_option():
    message = _error({"forget_rate": 1})
    assert message == "unknown option 'forget_rate'; did you mean 'forget_lr'?"
    assert "unknown option 'mask.gama'; did you mean 'mask.gamma'?" == _error({"mask": {"gama": 2}})
    message = _error({"method": "salun", "adaptive_lambda": 0.3})
    assert "method_args.adaptive_lambda" in message and "'salun'" in message and "salun_label" in message


@pytest.mark.parametrize("values, key", [
    ({"betas": [0.8]}, "forget_optimizer.betas: expects 2 values"),
    ({"iterations": 2.7}, "iterations:"),
    ({"iterations": 0}, "iterations:"),
    ({"iterations": -5}, "iterations:"),
    ({"batch_size": 0}, "batch_size:"),
    ({"retain_batch_size": 0}, "retain_batch_size:"),
    ({"optim": "triple"}, "optim:"),
    ({"sampler": {"steps": 0}}, "sampler.steps:"),
    ({"sample_batch_size": 0}, "sampler.sample_batch_size:"),
    ({"checkpoint_every": 0}, "checkpoint_every:"),
    ({"fisher_batch_size": 0}, "mask.fisher_batch_size:"),
    ({"forget_optim": "lion"}, "forget_optimizer.name:"),
    ({"method": "sa", "sa_samples_per_class": 0}, "method_args.sa_samples_per_class:"),
    ({"method": "salun", "salun_label": "prev"}, "method_args.salun_label:"),
    ({"forget_steps": 0, "retain_steps": 0}, "would take no step"),
    ({"method": "ft", "retain_steps": 0}, "would take no step"),
])
def test_bad_values_are_one_line_user_errors(values, key):
    message = _error(values)
    assert key in message and "pydantic" not in message and "validation error" not in message
    assert all(": " in line for line in message.splitlines())  # one `key: problem` line each


def test_counts_of_other_commands_are_checked():
    assert "per_class:" in _error({"per_class": 0}, SampleConfig)
    assert "fa_samples:" in _error({"fa_samples": 0}, EvalConfig)
    assert "fid_reference_count:" in _error({"fid_reference_count": 0}, EvalConfig)
    assert "jobs:" in _error({"jobs": 0}, StudyConfig)
    assert "iterations:" in _error({"iterations": 0}, PretrainConfig)
    assert "mask.file" in _error({"mask": "m.safetensors"}, MaskConfig)


def test_cli_integers_are_integers_like_yaml(tmp_path):
    with pytest.raises(UserError, match="iterations"):
        _parse(["--iterations", "2.7"])
    path = tmp_path / "c.yaml"
    path.write_text("iterations: 2.7\n")
    with pytest.raises(UserError, match="iterations"):
        _parse(["--config", str(path)])


def test_help_shows_each_default():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ForgetConfig)
    text = " ".join(parser.format_help().split())
    for flag, default in [("--forget-lr LR, --forget-optimizer.lr LR", "(default: 0.0001)"),
                          ("--gamma GAMMA, --mask.gamma GAMMA", "(default: 3.0)"),
                          ("--ewc-lambda EWC_LAMBDA, --method-args.ewc-lambda EWC_LAMBDA",
                           "method argument of sa (default: 10.0)")]:
        assert f"{flag} {default}" in text


def test_resolved_config_yaml_round_trips(tmp_path):
    cfg = build_config(ForgetConfig, {"forget_class": 2, "mask": None, "retain_betas": [0.5, 0.6],
                                      "sampler": {"eta": 1.0}, "method": "sa", "ewc_lambda": 2})
    write_config_yaml(cfg, tmp_path / "config.yaml")
    written = load_yaml(tmp_path / "config.yaml")
    assert written["method_args"]["ewc_lambda"] == 2.0 and written["sampler"]["eta"] == 1.0  # nested, whole
    assert build_config(ForgetConfig, written) == cfg
    assert _parse(["--config", str(tmp_path / "config.yaml")]) == cfg
    assert config_to_dict(cfg)["retain_optimizer"]["betas"] == (0.5, 0.6)


def test_every_preset_builds_for_its_command():
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        cls = PretrainConfig if "pretrain" in path.stem or "retrain" in path.stem else ForgetConfig
        cfg = build_config(cls, yaml_values(cls, path))
        if cls is ForgetConfig:
            assert cfg.method == load_yaml(path)["method"]
    sfron = build_config(ForgetConfig, yaml_values(ForgetConfig, CONFIG_DIR / "digits-sfron.yaml"))
    assert (sfron.method, sfron.optim, sfron.mask.gamma, sfron.method_args["adaptive_lambda"]) == \
        ("sfron", "dual", 3.0, 0.5)
    assert option_values(sfron)["forget_lr"] == 1e-4


def test_a_preset_error_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("sampler:\n  seed: 3\n")
    with pytest.raises(UserError, match=r"mine.yaml: unknown option 'sampler.seed'"):
        _parse(["--config", str(path)])
    path.write_text("iterations: [1\n")
    with pytest.raises(UserError, match="not valid YAML"):
        _parse(["--config", str(path)])


def _readme_commands() -> list[list[str]]:
    """Every `diffusion-unlearn ...` command of the README's code blocks, continuation lines joined."""
    commands, text = [], README.read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("diffusion-unlearn "):
                commands.append(shlex.split(line.replace("$C", "1"))[1:])
    return commands


def test_every_readme_command_parses_with_the_real_parser():
    commands = _commands()
    parser = build_parser(commands)
    argvs = _readme_commands()
    assert len(argvs) >= 15 and {a[0] for a in argvs} >= {"pretrain", "forget", "eval", "study", "convert"}
    for argv in argvs:
        ns = parser.parse_args(argv)
        config_from_args(commands[argv[0]][0], ns)  # builds and validates, runs nothing


def test_pretrain_learning_rate_schedule():
    from diffusion_unlearn.pretrain import learning_rate  # imports torch: kept out of the module's imports

    cosine = build_config(PretrainConfig, {"iterations": 100, "lr": 1e-3, "lr_schedule": "cosine",
                                           "warmup_iterations": 10})
    assert learning_rate(cosine, 0) == pytest.approx(1e-4)  # warm-up 1/10, cosine factor 1
    assert learning_rate(cosine, 9) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.09)))
    assert learning_rate(cosine, 50) == pytest.approx(5e-4)
    assert learning_rate(cosine, 99) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.99)))
    constant = build_config(PretrainConfig, {"iterations": 100, "lr": 1e-3})
    assert {learning_rate(constant, k) for k in range(100)} == {1e-3}  # the default: unchanged training

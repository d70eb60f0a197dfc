"""Start-up: the CLI's parser and `--help` import no heavy module; a command's function is imported when it runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion_unlearn.cli import _commands, build_parser, command_function

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "accelerate", "torch_fidelity", "matplotlib", "timm", "scipy")


def _loaded_after(code: str) -> set[str]:
    """The heavy modules a fresh interpreter has loaded after running `code`."""
    probe = f"{code}\nimport sys\nprint('loaded:', *(m for m in {HEAVY!r} if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    return set(out.stdout.splitlines()[-1].split()[1:])  # the last line, after `--help`'s text


@pytest.mark.parametrize("command", ["", *_commands()])
def test_parser_and_help_import_nothing_heavy(command):
    build = f"from diffusion_unlearn.cli import _commands, build_parser\nbuild_parser(_commands(), only={command!r})"
    assert _loaded_after(build) == set()
    argv = [command, "--help"] if command else ["--help"]
    help_run = f"from diffusion_unlearn.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    assert _loaded_after(help_run) == set()


def test_a_forget_config_imports_no_method():
    """`forget`'s flags and its config's `method_args` check come from the methods' torch-free arguments classes."""
    build = ("from diffusion_unlearn.config import ForgetConfig, build_config\n"
             "cfg = build_config(ForgetConfig, {'method': 'sa', 'ewc_lambda': 3})\n"
             "assert cfg.method_args['ewc_lambda'] == 3.0 and cfg.method_args['sa_fisher_chunk'] == 50")
    assert _loaded_after(build) == set()


def test_builtin_method_arguments_are_the_registry_s():
    """The torch-free table lists the registered built-in methods in order, each method subclassing its
    arguments class; the derived flags are the same before and after the methods load."""
    from diffusion_unlearn import config
    from diffusion_unlearn.method_args import BUILTIN_METHOD_ARGS

    probe = ("from diffusion_unlearn import config\n"
             "print(config.method_arguments())\n"
             "from diffusion_unlearn.methods import METHODS\n"
             "config.forget_registry_caches()\n"
             "print(config.method_arguments())")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    before, after = out.stdout.splitlines()
    assert before == after and "adaptive_lambda" in before

    from diffusion_unlearn.methods import METHODS

    assert config.method_argument_classes() is METHODS
    builtin = list(METHODS)[:len(BUILTIN_METHOD_ARGS)]
    assert builtin == list(BUILTIN_METHOD_ARGS)
    for name, args in BUILTIN_METHOD_ARGS.items():
        assert issubclass(METHODS[name], args) and METHODS[name].arguments() == args.arguments(), name


def test_every_command_function_resolves():
    for name, (_, target, _) in _commands().items():
        assert callable(command_function(target)), name


def test_one_command_parser_parses_like_the_full_one():
    commands = _commands()
    argv = ["sample", "--model", "m", "--steps", "7"]
    assert vars(build_parser(commands, only="sample").parse_args(argv)) == vars(build_parser(commands).parse_args(argv))

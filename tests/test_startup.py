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


@pytest.mark.parametrize("command", ["", *(c for c in _commands() if c != "forget")])
def test_parser_and_help_import_nothing_heavy(command):
    build = f"from diffusion_unlearn.cli import _commands, build_parser\nbuild_parser(_commands(), only={command!r})"
    assert _loaded_after(build) == set()
    argv = [command, "--help"] if command else ["--help"]
    help_run = f"from diffusion_unlearn.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    assert _loaded_after(help_run) == set()


def test_forget_parser_imports_the_method_registry_only():
    """`forget`'s flags include every registered method's arguments: the methods (and torch) load, nothing else."""
    build = "from diffusion_unlearn.cli import _commands, build_parser\nbuild_parser(_commands(), only='forget')"
    assert _loaded_after(build) == {"torch"}


def test_every_command_function_resolves():
    for name, (_, target, _) in _commands().items():
        assert callable(command_function(target)), name


def test_one_command_parser_parses_like_the_full_one():
    commands = _commands()
    argv = ["sample", "--model", "m", "--steps", "7"]
    assert vars(build_parser(commands, only="sample").parse_args(argv)) == vars(build_parser(commands).parse_args(argv))

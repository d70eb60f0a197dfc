"""Test helper, run by `accelerate launch`: the CLI with `ARGS`, killed in every process after the KILL_AFTER-th EMA
update (KeyboardInterrupt; 0: never).   usage: ddp_launch.py KILL_AFTER ARGS..."""

import sys

from builders import ema_update_that_kills  # this script's folder, tests/, is on sys.path
from diffusion_unlearn.cli import main
from diffusion_unlearn.ema import EMA

if __name__ == "__main__":
    kill_after, args = int(sys.argv[1]), sys.argv[2:]
    if kill_after:
        EMA.update = ema_update_that_kills(kill_after)[0]
    sys.exit(main(args))

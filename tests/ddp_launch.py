"""Test helper, run by `accelerate launch`: the CLI with `ARGS`, killed in every process after the KILL_AFTER-th EMA
update (KeyboardInterrupt; 0: never).   usage: ddp_launch.py KILL_AFTER ARGS..."""

import sys

from diffusion_unlearn.cli import main
from diffusion_unlearn.ema import EMA

if __name__ == "__main__":
    kill_after, args = int(sys.argv[1]), sys.argv[2:]
    if kill_after:
        original, updates = EMA.update, [0]

        def killing_update(self):
            original(self)
            updates[0] += 1
            if updates[0] == kill_after:
                raise KeyboardInterrupt

        EMA.update = killing_update
    sys.exit(main(args))

"""`python -m emdpo_plugin ...`: the same CLI as `openrlhf` / `emdpo`, for launchers that start modules
(`torchrun -m emdpo_plugin run ...`, `deepspeed --module emdpo_plugin run ...`)."""

import sys

from .cli import main

sys.exit(main())

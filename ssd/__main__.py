"""``python -m ssd ARGS`` is ``ssd-train ARGS``; under torchrun: ``torchrun --nproc_per_node=N -m ssd ARGS``."""
from .cli import train_main

train_main()

"""ldmlab: train latent diffusion models with PyTorch Lightning and Hydra."""

import os

# libgomp threads spin-wait by default; when processes outnumber cores (DataLoader workers, DDP ranks and
# tests sharing a 2-core CI box) a spinning team stalls a CPU training step for minutes. Passive waiting
# costs little on an idle machine. Must be set before torch loads OpenMP; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

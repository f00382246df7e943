"""Pure nn.Module networks: import torch only (no lightning, hydra, omegaconf, wandb)."""

"""Diffusion math as small pure functions: import torch only."""

"""Pure loss functions of tensors: import torch only."""

"""LightningModules."""

import warnings

# Frozen networks inside our modules (LPIPS, the LDM's VAE and text encoder) stay in eval mode on purpose;
# Lightning 2.6 warns about every such submodule at fit start.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

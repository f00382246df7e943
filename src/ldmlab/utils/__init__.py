"""Small helpers shared by the Lightning layer (images, config checks)."""

"""The Hydra config tree (package data). Importing it registers the resolvers its yaml files use."""

from ldmlab import configs  # noqa: F401

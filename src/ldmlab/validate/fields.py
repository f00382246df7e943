"""Reading config fields without tripping over `???`, unresolvable interpolations or absent groups."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def get(cfg: DictConfig | ListConfig, key: str) -> Any:
    """The value at dotted `key`, or None when absent, `???` or not resolvable (other rules report those)."""
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False, throw_on_resolution_failure=False)


def target(cfg: DictConfig, key: str) -> str:
    """The `_target_` of the node at `key` ("" when none)."""
    return str(get(cfg, f"{key}._target_") or "")


def image_size(cfg: DictConfig) -> tuple[int | None, str]:
    """The training image side and the field a user sets it with (the demo's decoder follows its crop_size)."""
    decoder = get(cfg, "data.decoder")
    if (isinstance(decoder, DictConfig) and "image_size" in decoder and OmegaConf.is_interpolation(decoder, "image_size")
            and get(cfg, "data.source.crop_size") is not None):
        return get(cfg, "data.source.crop_size"), "data.source.crop_size"
    return get(cfg, "data.decoder.image_size"), "data.decoder.image_size"


def world_size(cfg: DictConfig) -> int | None:
    """trainer.devices x trainer.num_nodes when the config fixes it, else None (the rules that need it stand aside).

    Lightning's forms: an int or "4" is a count; a list or "0,1" names device indices (their count); "auto", -1
    and "-1" (or a resolver that only the run can resolve) depend on the machine: None.
    """
    devices, nodes = get(cfg, "trainer.devices"), get(cfg, "trainer.num_nodes") or 1
    if isinstance(devices, ListConfig):
        devices = len(devices)
    elif isinstance(devices, str) and "," in devices:
        devices = len([d for d in devices.split(",") if d.strip()])
    elif isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    return devices * nodes if isinstance(devices, int) and devices >= 1 and isinstance(nodes, int) else None

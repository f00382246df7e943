"""Sample images from a checkpoint: `python sample.py ckpt=... sampler=dpmpp_2m steps=25 guidance=5 n=16`."""

import hydra
from omegaconf import DictConfig

from ldmlab.sample import sample


@hydra.main(version_base="1.3", config_path="pkg://ldmlab.conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()

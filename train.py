"""Train a model: `python train.py [group=option ...] [key=value ...]` (see `python train.py --help`)."""

import hydra
from omegaconf import DictConfig

from ldmlab.run import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()

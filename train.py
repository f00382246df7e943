"""Train a model: `python train.py [group=option ...] [key=value ...]` (see `python train.py --help`)."""


import hydra
from omegaconf import DictConfig

from ldmlab.run import train
from ldmlab.validate import exit_on_bad_overrides


@hydra.main(version_base="1.3", config_path="pkg://ldmlab.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    exit_on_bad_overrides()  # `model=unet_foo`: one line naming the valid options
    main()

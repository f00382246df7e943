"""`python -m ldmlab.pipeline [pipeline=demo_gpu] [key=value ...]`: see ldmlab.pipeline."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ldmlab.configs import CONF_DIR
from ldmlab.pipeline.run import run_pipeline


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="pipeline")
def main(cfg: DictConfig) -> None:
    report = run_pipeline(cfg)
    print(f"\nreport: {report}", flush=True)


if __name__ == "__main__":
    main()

"""The whole chain as one command: train a VAE → cache latents → train a class-conditional LDM → sample a grid
per guidance scale → judge the samples with a classifier trained on real crops → `report.md`.

    python -m ldmlab.pipeline                      # the CPU demo (conf/pipeline/demo.yaml), = `make demo`
    python -m ldmlab.pipeline pipeline=demo_gpu    # bigger crops and models, bf16 on one GPU

Every training stage is a normal `train.py` run (its own run dir, config composed from conf/train.yaml with
the overrides the preset lists) under one pipeline dir; stages whose outputs exist are skipped, so a re-run
after an interruption continues where it stopped. `run.py` orders the stages, `stages.py` runs them,
`classifier.py` is the judge, `report.py` writes the report.
"""

from ldmlab.pipeline.run import run_pipeline

__all__ = ["run_pipeline"]

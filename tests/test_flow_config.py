"""`python train.py model=unet_small model/diffusion/prediction=flow model/diffusion/sampler=flow_euler` composes, passes the config
check, builds a module that trains a step and samples; flow with a DDPM-family sampler (and the reverse) is refused
in one line at config time, in train.py and in sample.py."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
from conftest import REPO, compose_train, make_tiny_vae_export
from omegaconf import OmegaConf

from ldmlab.diffusion import FlowMatching
from ldmlab.validate import check_config, sample_problems

pytestmark = pytest.mark.usefixtures("one_thread")
FLOW = ["model=unet_small", "model/diffusion/prediction=flow", "model/diffusion/sampler=flow_euler"]
TINY = ["model.unet.model_channels=32", "model.unet.channel_mult=[1,2]", "model.unet.attention_levels=[1]",
        "model.unet.norm_groups=8", "model.diffusion.sampler.num_steps=3"]


@pytest.fixture(scope="module")
def vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_vae_export(tmp_path_factory.mktemp("vae") / "vae.safetensors")


def test_flow_command_line_passes_the_check(tmp_path: Path, vae: Path) -> None:
    for sampler in ("flow_euler", "flow_heun"):
        cfg = compose_train([*FLOW, f"model/diffusion/sampler={sampler}", f"model.vae.path={vae}",
                             "model.diffusion.prediction.density=logit_normal", "model.diffusion.prediction.shift=3.0"], tmp_path)
        assert check_config(cfg) == [], sampler
        flow = hydra.utils.instantiate(cfg.model.diffusion.prediction)
        assert isinstance(flow, FlowMatching) and flow.density == "logit_normal" and flow.shift == 3.0


@pytest.mark.parametrize("overrides, needle, fix", [
    (["model/diffusion/sampler=ddim"], "model/diffusion/sampler=ddim cannot sample the flow-matching objective",
     "use model/diffusion/sampler=flow_euler or model/diffusion/sampler=flow_heun"),
    (["model/diffusion/prediction=eps"], "model/diffusion/sampler=flow_euler integrates a velocity, but model/diffusion/prediction is EpsPrediction",
     "use model/diffusion/sampler=ddim|ddpm|euler|dpmpp_2m, or model/diffusion/prediction=flow"),
])
def test_mismatched_objective_and_sampler_is_one_line(overrides, needle, fix, tmp_path: Path, vae: Path) -> None:
    found = check_config(compose_train([*FLOW, *overrides, f"model.vae.path={vae}"], tmp_path))
    lines = [line for line in found if needle in line]
    assert len(found) == 1 and len(lines) == 1 and fix in lines[0], found


class _Latents(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        return {"latent": torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(i)), "label": i % 10}


def test_flow_config_trains_samples_and_sample_py_refuses_ddim(tmp_path: Path, vae: Path) -> None:
    cfg = compose_train([*FLOW, f"model.vae.path={vae}", *TINY], tmp_path)
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.model, _convert_="all", optimizer=hydra.utils.instantiate(cfg.optimizer))
    module.config_yaml = OmegaConf.to_yaml(cfg, resolve=True)  # as ldmlab.fit.build stores it
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    trainer.fit(module, torch.utils.data.DataLoader(_Latents(), batch_size=4))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    images = module.sample([1, 2], 2, guidance_scale=3.0, seed=0)
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1  # tiny VAE: f4, 8x8 latents
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    sample_cfg = OmegaConf.load(REPO / "conf" / "sample.yaml")
    sample_cfg.ckpt, sample_cfg.sampler = str(ckpt), "ddim"
    found = sample_problems(sample_cfg)
    assert len(found) == 1 and found[0].startswith("sampler=ddim cannot sample the flow-matching objective"), found
    assert found[0].endswith("use sampler=flow_euler or sampler=flow_heun")
    sample_cfg.sampler = "flow_heun"
    assert sample_problems(sample_cfg) == []


def test_diffusers_pipeline_export_refuses_flow_in_one_line(tmp_path: Path, vae: Path) -> None:
    from ldmlab.convert.pipeline import scheduler_config

    cfg = compose_train([*FLOW, f"model.vae.path={vae}"], tmp_path)
    with pytest.raises(ValueError, match=r"^model.diffusion.prediction=flow has no StableDiffusionPipeline scheduler .*sample.py"):
        scheduler_config(OmegaConf.to_container(cfg.model, resolve=True))

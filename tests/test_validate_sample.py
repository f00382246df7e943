"""The config check of sample.py (ldmlab.validate.sample_problems): guidance vs condition dropout, mandatory
values, and prompts / labels against what the checkpoint was trained on (real one-step checkpoints)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_train, make_tiny_clip, make_tiny_vae_export, one
from omegaconf import DictConfig, OmegaConf

from ldmlab.validate import sample_problems

HYDRA_FRAME = ("Error executing job with overrides:", "Set the environment variable HYDRA_FULL_ERROR=1")


@pytest.fixture(scope="module")
def vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random f4 VAE export with 4-channel latents (safetensors, config in the metadata)."""
    return make_tiny_vae_export(tmp_path_factory.mktemp("vae") / "vae.safetensors")


def _fake_ldm_ckpt(path: Path, p_uncond: float) -> Path:
    torch.save({"ldmlab_config": OmegaConf.to_yaml({"model": {"p_uncond": p_uncond}}), "state_dict": {}}, path)
    return path


def test_sample_guidance_needs_a_model_trained_with_dropout(tmp_path: Path) -> None:
    cfg = OmegaConf.load(REPO / "conf" / "sample.yaml")
    cfg.ckpt, cfg.guidance = str(_fake_ldm_ckpt(tmp_path / "no_drop.ckpt", 0.0)), 5.0
    assert "sample with guidance=1" in one(sample_problems(cfg), "guidance=5.0", "model.training.p_uncond=0")
    cfg.guidance = 1.0
    assert sample_problems(cfg) == []
    cfg.ckpt, cfg.guidance = str(_fake_ldm_ckpt(tmp_path / "drop.ckpt", 0.1)), 5.0
    assert sample_problems(cfg) == []


def test_sample_mandatory_ckpt_sampler_and_compile(tmp_path: Path) -> None:
    cfg = OmegaConf.load(REPO / "conf" / "sample.yaml")
    cfg.sampler, cfg.compile = "bogus", "fast"
    found = sample_problems(cfg)
    assert "python sample.py ckpt=<value>" in one(found, "ckpt is mandatory (???)")
    assert "ddim" in one(found, "sampler=bogus is unknown")
    assert "valid are auto, none, regional, full" in one(found, "compile=fast is unknown")


# ---------------------------------------------------------------- sample.py: prompt and label vs the checkpoint

TINY_UNET = ["model.unet.model_channels=32", "model.unet.channel_mult=[1,2]", "model.unet.attention_levels=[1]",
             "model.unet.num_heads=4", "model.unet.norm_groups=8", "model.unet.num_res_blocks=1"]


class _Latents(torch.utils.data.Dataset):
    """Random 4x8x8 latents with a label and a prompt: what either conditioner reads."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        return {"latent": torch.randn(4, 8, 8), "label": i % 3, "text": "lower"}


def _train_checkpoint(overrides: list[str], tmp_path: Path) -> Path:
    """A real train.py-style checkpoint: the module the composed config builds, one step, save_checkpoint."""
    import hydra
    import pytorch_lightning as pl

    cfg = compose_train([*overrides, *TINY_UNET], tmp_path)
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.model, _convert_="all", optimizer=hydra.utils.instantiate(cfg.optimizer))
    module.config_yaml = OmegaConf.to_yaml(cfg, resolve=True)  # as ldmlab.fit.build stores it
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    trainer.fit(module, torch.utils.data.DataLoader(_Latents(), batch_size=4))
    path = tmp_path / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def class_ckpt(tmp_path_factory: pytest.TempPathFactory, vae: Path) -> Path:
    """unet_small: class-conditional on the demo's 10 classes."""
    root = tmp_path_factory.mktemp("class_ckpt")
    return _train_checkpoint(["model=unet_small", f"model.vae.path={vae}"], root)


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory: pytest.TempPathFactory, vae: Path) -> Path:
    """unet_sd15's classes on a random 32-wide CLIP."""
    root = tmp_path_factory.mktemp("text_ckpt")
    clip = make_tiny_clip(root / "clip")
    return _train_checkpoint(["model=unet_sd15", "data=demo", f"model.vae.path={vae}", f"model.conditioner.path={clip}",
                              "model.unet.context_dim=32", "model.latent_scale=null"], root)


def sample_cfg(ckpt: Path, **values: object) -> DictConfig:
    cfg = OmegaConf.load(REPO / "conf" / "sample.yaml")
    cfg.ckpt = str(ckpt)
    for key, value in values.items():
        cfg[key] = value
    return cfg


def test_sample_prompt_on_a_class_model_is_refused(class_ckpt: Path) -> None:
    line = one(sample_problems(sample_cfg(class_ckpt, prompt="a cat")), "prompt='a cat'")
    assert f"{class_ckpt} is class-conditional, so the prompt would be ignored" in line
    assert "give label=<0..9> (model.conditioner.num_classes=10)" in line
    one(sample_problems(sample_cfg(class_ckpt, label=10)), "label=10 is not a class of", "label=<0..9>")
    assert sample_problems(sample_cfg(class_ckpt, label=3)) == sample_problems(sample_cfg(class_ckpt)) == []


def test_sample_label_on_a_text_model_is_refused(text_ckpt: Path) -> None:
    line = one(sample_problems(sample_cfg(text_ckpt, label=3, prompt="lower")), "label=3")
    assert f"{text_ckpt} is text-conditional, so the label would be ignored: give prompt=" in line
    one(sample_problems(sample_cfg(text_ckpt)), "prompt is null", "text-conditional")
    assert sample_problems(sample_cfg(text_ckpt, prompt="lower")) == []


def test_sample_values_on_an_unconditional_model_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "uncond.ckpt"
    torch.save({"ldmlab_config": OmegaConf.to_yaml({"model": {"conditioner": None, "p_uncond": 0.0}})}, path)
    one(sample_problems(sample_cfg(path, prompt="a cat")), "prompt=a cat", "is unconditional", "drop prompt=")
    one(sample_problems(sample_cfg(path, label=1)), "label=1", "is unconditional")


@pytest.mark.slow
def test_sample_py_refuses_a_prompt_for_a_class_model_before_loading(class_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    proc = subprocess.run([sys.executable, str(REPO / "sample.py"), f"ckpt={class_ckpt}", "prompt=a cat",
                           f"out={out}", "n=2"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and not out.exists(), proc.stdout[-2000:]
    # one line of ours; Hydra frames a job's error with "Error executing job ..." and a HYDRA_FULL_ERROR hint
    ours = [line for line in proc.stderr.splitlines() if line and not line.startswith(HYDRA_FRAME)]
    assert len(ours) == 1 and ours[0].startswith("prompt='a cat' but "), proc.stderr[-3000:]
    assert "class-conditional" in ours[0] and "Traceback" not in proc.stderr

"""`finetune=lora` end to end on the CPU: train.py from a pretrained U-Net file, the checkpoint, the EMA, the
adapter export, and sample.py with `lora=<file> lora_scale=<s>` (issue 20)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from conftest import CONF, compose_train, run_train
from hydra import compose, initialize_config_dir
from PIL import Image

from ldmlab.convert.checkpoint import load_ldmlab
from ldmlab.finetune.lora import lora_modules, lora_state_dict
from ldmlab.finetune.lora_formats import load_lora_file
from ldmlab.lit.finetune import LoRA
from ldmlab.lit.weights import save_weights
from ldmlab.nn.safe_load import load_weights_only
from ldmlab.sample import load_ldm, sample
from ldmlab.utils.images import make_grid, save_png
from ldmlab.validate import check_config


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, tiny_assets: dict[str, Path]) -> dict[str, Path]:
    """A random unet_small (non-zero output layers) saved as the pretrained file, then 6 LoRA steps from it (lr high enough to show)."""
    root = tmp_path_factory.mktemp("lora")
    vae = f"model.vae.path={tiny_assets['vae']}"
    unet = hydra.utils.instantiate(compose_train(["model=unet_small", vae], root).model.unet)
    with torch.no_grad():  # a pretrained U-Net: its zero-initialised output layers (no gradient past them) trained
        for p in unet.parameters():
            if not p.any():
                p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(p.numel()))
    init = save_weights(root / "init" / "unet.safetensors", unet.state_dict(), dict(unet.config), "unet")
    run_dir = root / "run"
    run_train(["model=unet_small", vae, "finetune=lora", f"model.training.unet_init={init}", "debug=limit",
               "data.batch_size=4", "data.num_workers=0", "model.diffusion.sampler.num_steps=2", "optimizer.lr=1e-2",
               "lr_scheduler.warmup_steps=1", "model.finetune.rank=4", f"hydra.run.dir={run_dir}"], cwd=root)
    return {"init": init, "run": run_dir, "ckpt": run_dir / "checkpoints" / "last.ckpt"}


def test_lora_run_trains_adapters_only(lora_run: dict[str, Path]) -> None:
    base, _ = load_ldmlab(lora_run["init"], "unet")
    ckpt = load_weights_only(lora_run["ckpt"])
    unet = {k.removeprefix("unet."): v for k, v in ckpt["state_dict"].items() if k.startswith("unet.")}
    adapters = {k: v for k, v in unet.items() if ".lora." in k}
    assert adapters and set(unet) - set(adapters) == set(base)
    for k, v in base.items():  # the frozen base, bit for bit
        assert torch.equal(unet[k], v), k
    assert all(adapters[k].abs().max() > 0 for k in adapters if k.endswith("lora.B.weight"))  # B starts at 0
    shadow = ckpt["callbacks"]["EMA"]["shadow"]  # the EMA averages the trainable adapters only
    assert set(shadow) == {k for k in adapters if k.endswith((".A.weight", ".B.weight"))}
    export = lora_run["run"] / "export"
    assert {p.name for p in export.iterdir()} >= {"unet_lora.safetensors", "unet_lora_kohya.safetensors"}
    assert not (export / "unet.safetensors").exists()  # no copy of the base


@pytest.mark.parametrize("name", ["unet_lora.safetensors", "unet_lora_kohya.safetensors"])
def test_exported_lora_on_the_init_unet_reproduces_the_run(lora_run: dict[str, Path], name: str) -> None:
    module = load_ldm(lora_run["ckpt"])  # EMA adapters: what the export holds
    fresh = type(module.unet)(**module.unet.config)
    base, _ = load_ldmlab(lora_run["init"], "unet")
    fresh.load_state_dict(base)
    load_lora_file(lora_run["run"] / "export" / name, fresh)
    x = torch.randn(2, *module.latent_shape, generator=torch.Generator().manual_seed(0))
    t, cond = torch.tensor([10, 500]), module.conditioner.from_values([1, 2], module.device)
    with torch.no_grad():
        trained, loaded = module.unet(x, t, **cond), fresh.eval()(x, t, **cond)
    assert torch.allclose(loaded, trained, atol=1e-5)


def _sample(ckpt: Path, out: Path, **extra: object) -> np.ndarray:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt={ckpt}", f"out={out}", "n=2", "steps=2", "label=1", "device=cpu",
                                           *[f"{k}={v}" for k, v in extra.items()]])
    return np.asarray(Image.open(sample(cfg)))


def test_sample_py_lora_scale(lora_run: dict[str, Path], tmp_path: Path) -> None:
    lora = lora_run["run"] / "export" / "unet_lora.safetensors"
    off = _sample(lora_run["ckpt"], tmp_path / "off.png", lora=lora, lora_scale=0)
    on = _sample(lora_run["ckpt"], tmp_path / "on.png", lora=lora, lora_scale=1)
    own = _sample(lora_run["ckpt"], tmp_path / "own.png")  # the checkpoint's own (EMA) adapters = the file's
    module = load_ldm(lora_run["ckpt"])
    base = type(module.unet)(**module.unet.config)
    base.load_state_dict(load_ldmlab(lora_run["init"], "unet")[0])
    module.unet = base.eval()  # the pretrained U-Net alone, no adapters
    images = module.sample([1, 1], 2, seed=0, sampler=partial(module.diffusion.sampler, num_steps=2))
    save_png(make_grid(images, nrow=8), tmp_path / "base.png")
    assert np.array_equal(off, np.asarray(Image.open(tmp_path / "base.png")))
    assert not np.array_equal(on, off)
    assert np.array_equal(on, own)


def test_sample_py_names_a_missing_lora_file(lora_run: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"lora=\S*nothere.safetensors not found"):
        _sample(lora_run["ckpt"], tmp_path / "x.png", lora=tmp_path / "nothere.safetensors")


def test_lora_on_a_model_without_unet_is_one_line(tmp_path: Path) -> None:
    problems = check_config(compose_train(["finetune=lora"], tmp_path))  # the default model: the tiny VAE
    assert [p for p in problems if p.startswith("model.finetune is set")] == problems


def test_finetune_full_changes_nothing(tmp_path: Path, tiny_assets: dict[str, Path]) -> None:
    args = ["model=unet_small", f"model.vae.path={tiny_assets['vae']}"]
    full, default = compose_train([*args, "finetune=full"], tmp_path), compose_train(args, tmp_path)
    assert full == default and "finetune" not in full.model
    module = hydra.utils.instantiate(full.model)
    assert not list(lora_modules(module.unet)) and all(p.requires_grad for p in module.unet.parameters())
    lora = hydra.utils.instantiate(compose_train([*args, "finetune=lora"], tmp_path).model)
    assert isinstance(lora.finetune, LoRA) and lora_state_dict(lora.unet)
    assert {n for n, p in lora.unet.named_parameters() if p.requires_grad} == \
        {k for k in lora_state_dict(lora.unet) if not k.endswith("alpha")}

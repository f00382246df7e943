"""Textual Inversion (issue 20): new token rows alone train, diffusers' load_textual_inversion reads the export and
encodes prompts as we do, and `train.py finetune=textual_inversion` on an image folder through to sample.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_train
from PIL import Image
from safetensors.torch import load_file, save_file

from ldmlab.finetune.textual_inversion import (
    ExtendedEmbedding,
    expand_prompt,
    init_vector,
    load_learned_embeds,
    save_learned_embeds,
)
from ldmlab.lit.conditioning import TextConditioner
from ldmlab.lit.finetune import TextualInversion
from ldmlab.validate import check_config

CPU = torch.device("cpu")
INIT = "low"  # one token of the tiny CLIP vocabulary (utils/stand_ins.make_tiny_clip)


def concept(clip: Path, token: str = "<toy>", num_vectors: int = 2) -> TextConditioner:
    text = TextConditioner(clip)
    TextualInversion(token, INIT, num_vectors).apply(torch.nn.Linear(1, 1), text)
    return text


def test_new_rows_start_from_the_init_word_and_prompts_spell_out_every_vector(tiny_assets: dict[str, Path]) -> None:
    text = concept(tiny_assets["clip32"])
    embedding = text.encoder.get_input_embeddings()
    assert isinstance(embedding, ExtendedEmbedding) and embedding.new.shape == (2, 32)
    base = TextConditioner(tiny_assets["clip32"])
    word = init_vector(base.tokenizer, base.encoder, INIT)
    assert torch.equal(embedding.new[0], word) and torch.equal(embedding.new[1], word)
    assert expand_prompt("a <toy> low", text.tokenizer) == "a <toy> <toy>_1 low"
    ids = text.tokenizer(expand_prompt("<toy> low", text.tokenizer), add_special_tokens=False).input_ids
    assert ids == [len(base.tokenizer), len(base.tokenizer) + 1, *base.tokenizer(INIT, add_special_tokens=False).input_ids]
    # the old tokens read the old matrix: a prompt without the token encodes exactly as before
    assert torch.equal(text.encode(["low newer"], CPU), base.encode(["low newer"], CPU))


def test_only_the_new_rows_move_under_adamw_with_weight_decay(tiny_assets: dict[str, Path]) -> None:
    text = concept(tiny_assets["clip32"])
    trainable = [n for n, p in text.named_parameters() if p.requires_grad]
    assert trainable == ["encoder.text_model.embeddings.token_embedding.new"] or trainable == [
        "encoder.embeddings.token_embedding.new"]
    frozen = {k: v.clone() for k, v in text.state_dict().items() if not k.endswith(".new")}
    opt = torch.optim.AdamW([p for p in text.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    start = text.encoder.get_input_embeddings().new.detach().clone()
    for _ in range(3):
        loss = text.encode(["a <toy>"], CPU).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = text.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # every other row (and weight) bit-identical
    assert not torch.equal(text.encoder.get_input_embeddings().new, start)


def test_diffusers_load_textual_inversion_encodes_prompts_as_we_do(tiny_assets: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    """Our learned_embeds file through diffusers' loader and its prompt conversion: the same hidden states."""
    from diffusers.loaders import TextualInversionLoaderMixin
    from transformers import CLIPTextModel, CLIPTokenizer

    text = concept(tiny_assets["clip32"], num_vectors=2)
    with torch.no_grad():
        text.encoder.get_input_embeddings().new.normal_(generator=torch.Generator().manual_seed(0))
    path = save_learned_embeds(tmp_path / "learned_embeds.safetensors", text.tokenizer, text.encoder, "<toy>")
    assert {k: v.shape for k, v in load_file(path).items()} == {"<toy>": (2, 32)}

    class Loader(TextualInversionLoaderMixin):  # load_textual_inversion needs a pipeline's offload attributes only
        hf_device_map, components = None, {}

    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_assets["clip32"]))
    encoder = CLIPTextModel.from_pretrained(str(tiny_assets["clip32"])).eval()
    loader = Loader()
    loader.load_textual_inversion(str(path), tokenizer=tokenizer, text_encoder=encoder)
    prompt = loader.maybe_convert_prompt("a <toy> low", tokenizer)
    ids = tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = encoder(ids).last_hidden_state
        ours = text.encode(["a <toy> low"], CPU)
    assert torch.allclose(ours, theirs, atol=1e-6)
    # and back: the file into a fresh conditioner, under another name
    fresh = TextConditioner(tiny_assets["clip32"])
    assert load_learned_embeds(path, fresh.tokenizer, fresh.encoder, "<cat>") == ["<cat>", "<cat>_1"]
    with torch.no_grad():
        assert torch.equal(fresh.encode(["a <cat> low"], CPU), ours)


def test_bad_tokens_words_and_files_are_one_line(tiny_assets: dict[str, Path], tmp_path: Path) -> None:
    text = TextConditioner(tiny_assets["clip32"])
    with pytest.raises(ValueError, match=r"token='low</w>' is already in the tokenizer's vocabulary"):
        TextualInversion("low</w>", INIT).apply(torch.nn.Linear(1, 1), text)
    with pytest.raises(ValueError, match=r"init_word='lowest' is \d+ tokens .*, not one"):
        TextualInversion("<x>", "lowest").apply(torch.nn.Linear(1, 1), text)
    with pytest.raises(ValueError, match="needs a text-conditioned model"):
        TextualInversion("<x>", INIT).apply(torch.nn.Linear(1, 1), None)
    save_file({"<y>": torch.zeros(1, 768)}, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(ValueError, match=r"shape \(1, 768\) but this text encoder's tokens have width 32"):
        load_learned_embeds(tmp_path / "sd15.safetensors", text.tokenizer, text.encoder)
    with pytest.raises(FileNotFoundError, match="embedding=.*missing.safetensors not found"):
        load_learned_embeds(tmp_path / "missing.safetensors", text.tokenizer, text.encoder)


def test_textual_inversion_on_a_class_model_is_refused_at_config_time(tmp_path: Path) -> None:
    cfg = compose_train(["model=unet_small", "finetune=textual_inversion"], tmp_path)
    assert [line for line in check_config(cfg) if "finetune=textual_inversion needs prompts" in line]
    assert cfg.callbacks.get("ema") is None  # nothing of the U-Net trains: no EMA


# ---------------------------------------------------------------- train.py → export → diffusers / sample.py


def photo_folder(root: Path, token: str, n: int = 4) -> Path:
    """`n` 32 px crops of one bundled photograph, each captioned with the new token."""
    from skimage import data

    photo = data.chelsea()
    root.mkdir(parents=True)
    for i in range(n):
        crop = photo[40 * i:40 * i + 200, 60 * i:60 * i + 200]
        Image.fromarray(crop).resize((32, 32)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a {token}")
    return root


@pytest.mark.slow
def test_train_py_textual_inversion_exports_what_diffusers_and_sample_py_load(tiny_assets: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    """8 steps on 4 captioned photos: U-Net and old rows unchanged, the export drives a diffusers pipeline
    to sample.py's images (embedding= on the base checkpoint)."""
    import diffusers
    import hydra
    from conftest import run_train
    from test_convert_pipeline import LATENT, TOLERANCE, save_checkpoint, text_overrides

    from ldmlab.convert.__main__ import main as convert
    from ldmlab.lit.weights import save_weights
    from ldmlab.nn.safe_load import load_weights_only
    from ldmlab.sample import load_ldm

    base_ckpt = save_checkpoint(text_overrides(tiny_assets["clip32"], tiny_assets["vae"]), tmp_path, ema=False)
    unet = hydra.utils.instantiate(compose_train(text_overrides(tiny_assets["clip32"], tiny_assets["vae"]),
                                                 tmp_path).model.unet)
    unet.load_state_dict({k.removeprefix("unet."): v for k, v in load_weights_only(base_ckpt)["state_dict"].items()
                          if k.startswith("unet.")})
    init = save_weights(tmp_path / "init" / "unet.safetensors", unet.state_dict(), dict(unet.config), "unet")
    run = tmp_path / "run"
    run_train([*text_overrides(tiny_assets["clip32"], tiny_assets["vae"]), "finetune=textual_inversion",
               f"model.training.unet_init={init}", 'model.finetune.token="<toy>"', f"model.finetune.init_word={INIT}",
               "data=folder", f"data.source.src={photo_folder(tmp_path / 'photos', '<toy>')}",
               "data.decoder.image_size=32", "data.source.val_fraction=0", "data.batch_size=2",
               "data.num_workers=0", "data.samples_per_epoch=16", "trainer.max_steps=8", "optimizer.lr=5e-2",
               "lr_scheduler=constant", "trainer.num_sanity_val_steps=0", "callbacks.image_grids=null",
               f"hydra.run.dir={run}"], cwd=tmp_path)
    ckpt = load_weights_only(run / "checkpoints" / "last.ckpt")
    unet_after = {k.removeprefix("unet."): v for k, v in ckpt["state_dict"].items() if k.startswith("unet.")}
    assert all(torch.equal(unet_after[k], v) for k, v in unet.state_dict().items())  # the U-Net is frozen
    new = [v for k, v in ckpt["state_dict"].items() if k.startswith("conditioner.")]
    assert len(new) == 1 and new[0].shape == (1, 32)  # only the trained rows are stored
    clip = TextConditioner(tiny_assets["clip32"])
    start = init_vector(clip.tokenizer, clip.encoder, INIT)
    assert (new[0][0] - start).abs().max() > 1e-3
    embeds = run / "export" / "learned_embeds.safetensors"
    assert sorted(p.name for p in (run / "export").iterdir()) == ["learned_embeds.safetensors", "vae.safetensors"]
    assert torch.equal(load_file(embeds)["<toy>"], new[0])

    # diffusers: the base model's pipeline + the exported embedding ≡ ldmlab's base checkpoint + embedding=
    convert(["--from", "ldmlab", "--to", "diffusers", "--ckpt", str(base_ckpt), "--out", str(tmp_path / "pipe")])
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", dtype=torch.float32)
    pipe.load_textual_inversion(str(embeds))
    prompts = ["a <toy>", "a <toy>"]
    x_T = torch.randn((2, *LATENT), generator=torch.Generator().manual_seed(0))
    theirs = pipe(prompts, height=32, width=32, num_inference_steps=5, guidance_scale=2.0, latents=x_T,
                  output_type="pt").images * 2 - 1
    module = load_ldm(base_ckpt, use_ema=False)
    load_learned_embeds(embeds, module.conditioner.tokenizer, module.conditioner.encoder)
    ours = module.sample(prompts, 2, 2.0, seed=0)
    assert (ours - theirs).abs().max() < TOLERANCE
    plain = load_ldm(base_ckpt, use_ema=False).sample(["a low", "a low"], 2, 2.0, seed=0)
    assert (ours - plain).abs().max() > 1e-3  # the token is not the init word any more

    from test_finetune import _sample

    grid = _sample(base_ckpt, tmp_path / "g.png", embedding=embeds, prompt="'a <toy>'", guidance=2, label="null")
    assert grid.shape[:2] == (36, 70) and np.ptp(grid) > 0


def test_text_encoder_lora_trains_exports_and_reloads_with_the_unet(tiny_assets: dict[str, Path], tmp_path: Path) -> None:
    """finetune=lora model.finetune.text_encoder=true: adapters on both networks in the optimizer, the
    checkpoint (the frozen CLIP weights stay out) and one export file; sample.py's loader puts both back."""
    import hydra
    from omegaconf import OmegaConf
    from test_convert_pipeline import text_overrides

    from ldmlab.finetune.lora import lora_modules
    from ldmlab.finetune.lora_formats import lora_components
    from ldmlab.sample import add_fine_tunes

    cfg = compose_train([*text_overrides(tiny_assets["clip32"], tiny_assets["vae"]), "finetune=lora",
                         "model.finetune.rank=2", "model.finetune.text_encoder=true"], tmp_path)
    assert check_config(cfg) == []
    module = hydra.utils.instantiate(cfg.model)
    encoder = module.conditioner.encoder
    assert len(list(lora_modules(encoder))) == 2 * 4  # q, k, v, out of 2 layers
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trained and all(".lora." in n for n in trained) and any(n.startswith("conditioner.") for n in trained)
    with torch.no_grad():
        for _, lora in lora_modules(encoder):
            lora.B.weight.normal_(std=0.1, generator=torch.Generator().manual_seed(1))
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    stored = {k for k in ckpt["state_dict"] if k.startswith("conditioner.")}
    assert stored and all(".lora." in k for k in stored)  # the frozen CLIP weights are not stored
    paths = module.export_weights(tmp_path / "export")
    assert lora_components(paths[0]) == {"unet", "text_encoder"}
    want = module.conditioner.encode(["low newer"], CPU)

    fresh = hydra.utils.instantiate(compose_train(text_overrides(tiny_assets["clip32"], tiny_assets["vae"]),
                                                  tmp_path).model)
    add_fine_tunes(fresh, OmegaConf.create({"lora": str(paths[0]), "lora_scale": 1.0, "ckpt": "x"}))
    assert torch.allclose(fresh.conditioner.encode(["low newer"], CPU), want, atol=1e-6)
    add_fine_tunes(fresh, OmegaConf.create({"lora_scale": 0.0, "ckpt": "x"}))
    assert not torch.allclose(fresh.conditioner.encode(["low newer"], CPU), want, atol=1e-3)

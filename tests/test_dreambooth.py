"""DreamBooth (issue 20): rare identifiers, class images drawn once into resumable shards, the prior-preservation
loss in the same step, and `train.py finetune=dreambooth data=dreambooth` end to end (full weights and LoRA)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import hydra
import pytest
import torch
from conftest import compose_train, run_train
from test_convert_pipeline import text_overrides
from test_textual_inversion import photo_folder

from ldmlab.data import ShardDataModule
from ldmlab.data.decoders import ImageDecoder
from ldmlab.finetune.dreambooth import rare_identifiers, write_class_images
from ldmlab.lit.conditioning import TextConditioner
from ldmlab.validate import check_config


def test_rare_identifiers_are_single_whole_word_tokens(tiny_assets: dict[str, Path]) -> None:
    tokenizer = TextConditioner(tiny_assets["clip32"]).tokenizer
    found = rare_identifiers(tokenizer, n=5, id_range=(0.0, 1.0))
    assert sorted(found) == ["er", "low"]  # "lowest" is 6 letters; "wider" has no </w> token
    assert all(len(tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in found)
    with pytest.raises(ValueError, match="no whole-word tokens of <= 3 letters among this tokenizer's ids 2..4"):
        rare_identifiers(tokenizer)


def fake_draw(calls: list[tuple[int, int]]):
    """A deterministic stand-in for the model's sampler: image i is a flat grey of level i."""
    def draw(start: int, n: int) -> torch.Tensor:
        calls.append((start, n))
        return torch.stack([torch.full((3, 8, 8), (start + i) / 10 - 1) for i in range(n)])
    return draw


def test_class_images_are_written_once_resumed_and_grown(tmp_path: Path) -> None:
    out, calls = tmp_path / "dog", []
    write_class_images(out, "a dog", 7, fake_draw(calls), batch_size=2, shard_size=3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompt"] == "a dog" and manifest["counts"] == {
        "train-000000.tar": 3, "train-000001.tar": 3, "train-000002.tar": 1}
    assert calls == [(0, 2), (2, 1), (3, 2), (5, 1), (6, 1)]
    calls.clear()
    write_class_images(out, "a dog", 7, fake_draw(calls), shard_size=3)
    assert calls == []  # reused
    (out / "manifest.json").unlink()  # a kill before the manifest, with shard 1 lost too
    (out / "train-000001.tar").unlink()
    write_class_images(out, "a dog", 8, fake_draw(calls), batch_size=4, shard_size=3)
    assert calls == [(3, 3), (6, 2)]  # the missing shard and the grown last one only
    data = ShardDataModule(root=str(out), decoder=ImageDecoder(image_size=8, random_flip=False), batch_size=8,
                           num_workers=0)
    data.setup("fit")
    batch = data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)
    assert batch["text"] == ["a dog"] * 8
    levels = sorted(round(float(x), 1) for x in batch["image"].mean((1, 2, 3)))
    assert levels == pytest.approx([i / 10 - 1 for i in range(8)], abs=0.01)
    with pytest.raises(ValueError, match="class_dir=.* holds class images of 'a dog', not 'a cat'"):
        write_class_images(out, "a cat", 8, fake_draw(calls))


def test_the_prior_loss_is_added_with_its_weight_in_the_same_step(tiny_assets: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    """training_step on {"instance", "prior"} = diffusion_loss(instance) + λ · diffusion_loss(prior), same noise."""
    cfg = compose_train([*text_overrides(tiny_assets["clip32"], tiny_assets["vae"]), "finetune=dreambooth",
                         "data=dreambooth", f"data.instance.source.src={tmp_path}", "model.finetune.prior_weight=0.3",
                         "data.instance.decoder.image_size=32"], tmp_path)
    module = hydra.utils.instantiate(cfg.model)
    module.log = lambda *args, **kwargs: None  # no trainer here
    g = torch.Generator().manual_seed(0)
    batch = {k: {"image": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, "text": [f"a {w}", "low"]}
             for k, w in (("instance", "sks dog"), ("prior", "dog"))}
    loss = module.training_step(batch, 0)
    seeded = torch.Generator().manual_seed(hash((module.train_cfg.seed, 0, 0, 0)) % (2**63))
    p = module.train_cfg.p_uncond
    want = module.diffusion_loss(batch["instance"], seeded, p) + 0.3 * module.diffusion_loss(batch["prior"], seeded, p)
    assert torch.equal(loss, want)
    assert module.finetune.class_prompt == "a dog"


def test_dreambooth_config_mistakes_are_one_line(tiny_assets: dict[str, Path], tmp_path: Path) -> None:
    text = text_overrides(tiny_assets["clip32"], tiny_assets["vae"])
    lines = lambda args: check_config(compose_train(args, tmp_path))
    assert any("finetune=dreambooth trains on data=dreambooth" in x for x in lines([*text, "finetune=dreambooth"]))
    assert any("data=dreambooth feeds finetune=dreambooth" in x for x in lines([*text, "data=dreambooth"]))
    both = [*text, "finetune=dreambooth", "data=dreambooth"]
    assert any("data.instance.source.src=None: not set" in x for x in lines(both))
    (tmp_path / "empty").mkdir()
    assert any("no .jpg/.png/.webp images there" in x
               for x in lines([*both, f"data.instance.source.src={tmp_path / 'empty'}"]))
    assert any("finetune=dreambooth needs prompts" in x
               for x in lines(["model=unet_small", "finetune=dreambooth", "data=dreambooth"]))
    from ldmlab.lit.finetune import DreamBooth

    with pytest.raises(ValueError, match="prior_weight=1.0 needs class images: set model.finetune.num_class_images>0"):
        DreamBooth("sks", "dog", str(tmp_path), prior_weight=1.0, num_class_images=0)


def rows(run: Path) -> list[dict]:
    with open(run / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full", "lora", "no_prior"])
def test_train_py_dreambooth(tiny_assets: dict[str, Path], tmp_path: Path, variant: str) -> None:
    """4 steps on 3 photos: class images drawn before training (and reused by a second run), the prior loss
    logged, and the export the variant promises."""
    photos = photo_folder(tmp_path / "photos", "unused", n=3)
    for txt in photos.glob("*.txt"):
        txt.unlink()  # captions come from identifier + class noun
    class_dir = tmp_path / "class_images"
    extra = {"full": [], "lora": ["+model.finetune.lora={rank: 2, alpha: 2}"],
             "no_prior": ["model.finetune.prior_weight=0"]}[variant]
    args = [*text_overrides(tiny_assets["clip32"], tiny_assets["vae"]), "finetune=dreambooth", "data=dreambooth",
            f"data.instance.source.src={photos}", "data.instance.decoder.image_size=32", "data.instance.batch_size=2",
            "data.instance.num_workers=0", "data.instance.samples_per_epoch=8", "model.finetune.identifier=low",
            "model.finetune.class_noun=er", "model.finetune.num_class_images=4", f"model.finetune.class_dir={class_dir}",
            "model.finetune.guidance=1", "model.diffusion.sampler.num_steps=2", "trainer.max_steps=4",
            "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1", "trainer.val_check_interval=4",
            "trainer.limit_val_batches=1", *extra]
    run_train([*args, f"hydra.run.dir={tmp_path / 'a'}"], cwd=tmp_path)
    logged = [r for r in rows(tmp_path / "a") if r.get("train/loss")]
    assert len(logged) == 4
    if variant == "no_prior":
        assert not class_dir.exists() and not any(r.get("train/prior_loss") for r in logged)
        return
    manifest = json.loads((class_dir / "manifest.json").read_text())
    assert manifest["prompt"] == "a er" and manifest["splits"]["train"]["samples"] == 4
    assert all(float(r["train/prior_loss"]) > 0 for r in logged)
    export = {p.name for p in (tmp_path / "a" / "export").iterdir()}
    assert export >= ({"unet_lora.safetensors", "unet_lora_kohya.safetensors"} if variant == "lora"
                      else {"unet.safetensors"})
    assert (tmp_path / "a" / "images").is_dir()  # validation grids of the instance prompt
    if variant == "full":  # a second run reuses the class images
        stamp = {p.name: p.stat().st_mtime_ns for p in class_dir.iterdir()}
        run_train([*args, "trainer.max_steps=1", f"hydra.run.dir={tmp_path / 'b'}"], cwd=tmp_path)
        assert {p.name: p.stat().st_mtime_ns for p in class_dir.iterdir()} == stamp


@pytest.mark.slow
def test_dreambooth_lora_under_two_rank_ddp(tiny_assets: dict[str, Path], tmp_path: Path) -> None:
    """gloo, 2 processes: rank 0 draws the class images before the others read them; only adapters train."""
    photos = photo_folder(tmp_path / "photos", "a low er", n=3)
    class_dir = tmp_path / "class_images"
    run = tmp_path / "run"
    proc = run_train([*text_overrides(tiny_assets["clip32"], tiny_assets["vae"]), "finetune=dreambooth",
                      "data=dreambooth", f"data.instance.source.src={photos}", "data.instance.decoder.image_size=32",
                      "data.instance.batch_size=2", "data.instance.num_workers=0", "data.instance.samples_per_epoch=8",
                      "model.finetune.identifier=low", "model.finetune.class_noun=er", "model.finetune.num_class_images=4",
                      f"model.finetune.class_dir={class_dir}", "model.finetune.guidance=1", "model.diffusion.sampler.num_steps=2",
                      "model.finetune.lora={rank: 2, alpha: 2}", "trainer.accelerator=cpu", "trainer.devices=2",
                      "trainer.max_steps=2", "trainer.num_sanity_val_steps=0", "trainer.limit_val_batches=0",
                      "callbacks.image_grids=null", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stdout + proc.stderr
    assert json.loads((class_dir / "manifest.json").read_text())["splits"]["train"]["samples"] == 4
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and set(ckpt["callbacks"]["EMA"]["shadow"]) == {
        k.removeprefix("unet.") for k in ckpt["state_dict"] if ".lora." in k and k.endswith(".weight")}


def test_the_proofs_text_encoder_spells_every_caption_word_as_one_token(tmp_path: Path) -> None:
    from ldmlab.data.demo import class_names
    from ldmlab.pipeline.finetune_parts import build_text_encoder, caption

    words = sorted({w for n in class_names() for w in caption(n).split()} | {"sks"})
    text = TextConditioner(build_text_encoder(tmp_path / "clip", words))
    assert all(len(text.tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in words)
    assert text.encoder.get_input_embeddings().num_embeddings == len(text.tokenizer)
    assert rare_identifiers(text.tokenizer, id_range=(0.0, 1.0))  # the helper finds candidates in it too


def test_the_identifier_command_prints_candidates(tiny_assets: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    """`python -m ldmlab.finetune.dreambooth <tokenizer dir> [n]`, as the README gives it."""
    from ldmlab.finetune import dreambooth

    with pytest.raises(SystemExit, match="error: no whole-word tokens"):  # the tiny vocabulary's rare range is empty
        dreambooth.main([str(tiny_assets["clip32"]), "3"])
    with pytest.raises(SystemExit, match="usage: python -m ldmlab.finetune.dreambooth"):
        dreambooth.main([])

"""EMA callback: closed-form average under a real Trainer, restore on resume, checkpoints keep trained weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ldmlab.callbacks.ema import EMA, ema_decay


class TinyModule(pl.LightningModule):
    """A linear regression whose network sits in `unet`, as the EMA callback expects."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.unet = nn.Linear(3, 1)
        self.recorded: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.unet(x), y)

    def on_train_batch_end(self, *args) -> None:
        self.recorded.append({k: v.detach().clone() for k, v in self.unet.state_dict().items()})

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", nn.functional.mse_loss(self.unet(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def trainer(tmp_path: Path, max_steps: int, callbacks: list, **kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                      default_root_dir=tmp_path, callbacks=callbacks, enable_model_summary=False, **kw)


def test_decay_warmup_closed_form() -> None:
    assert ema_decay(0, 0.9999) == 0.0
    assert ema_decay(9, 0.9999, power=1.0) == pytest.approx(1 - 1 / 10)
    assert ema_decay(10**9, 0.9999) == 0.9999
    assert ema_decay(5, 0.9, warmup=False) == 0.9


def test_shadow_equals_closed_form_average(tmp_path: Path) -> None:
    decay, k = 0.8, 6
    module, ema = TinyModule(), EMA(decay=decay, warmup=False)
    initial = {n: p.detach().clone() for n, p in module.unet.state_dict().items()}
    trainer(tmp_path, k, [ema], limit_val_batches=0).fit(module, loader())
    for name, theta0 in initial.items():
        # s_k = d^k θ_0 + Σ_{i=1..k} (1−d) d^{k−i} θ_i
        expected = decay**k * theta0 + sum((1 - decay) * decay ** (k - i) * module.recorded[i - 1][name]
                                           for i in range(1, k + 1))
        torch.testing.assert_close(ema.shadow[name], expected)
    assert not torch.equal(ema.shadow["weight"], module.unet.weight)


def test_validation_uses_ema_but_checkpoint_keeps_trained_weights(tmp_path: Path) -> None:
    module, ema = TinyModule(), EMA(decay=0.5, warmup=False)
    seen: list[torch.Tensor] = []

    class Spy(pl.Callback):
        def on_validation_batch_start(self, trainer, pl_module, *args):
            seen.append(pl_module.unet.weight.detach().clone())

    t = trainer(tmp_path, 4, [ema, Spy()], val_check_interval=4, limit_val_batches=1, num_sanity_val_steps=0)
    t.fit(module, loader(), loader())
    torch.testing.assert_close(seen[-1], ema.shadow["weight"])  # validated with EMA weights
    torch.testing.assert_close(module.unet.weight, module.recorded[-1]["weight"])  # restored afterwards
    ckpt = torch.load(next((tmp_path / "checkpoints").glob("*.ckpt")), weights_only=True)
    torch.testing.assert_close(ckpt["state_dict"]["unet.weight"], module.recorded[-1]["weight"])
    torch.testing.assert_close(ckpt["callbacks"]["EMA"]["shadow"]["weight"], ema.shadow["weight"])


def test_resume_restores_shadow_and_continues(tmp_path: Path) -> None:
    decay = 0.7
    first = EMA(decay=decay, warmup=False)
    t1 = trainer(tmp_path / "a", 4, [first], limit_val_batches=0)
    t1.fit(TinyModule(), loader())
    t1.save_checkpoint(tmp_path / "half.ckpt")
    saved = {k: v.clone() for k, v in first.shadow.items()}

    resumed, module = EMA(decay=decay, warmup=False), TinyModule()
    trainer(tmp_path / "b", 7, [resumed], limit_val_batches=0).fit(module, loader(), ckpt_path=tmp_path / "half.ckpt")
    assert resumed.num_updates == 7 and len(module.recorded) == 3
    for name, s4 in saved.items():  # s_7 = d^3 s_4 + Σ_{i=1..3} (1−d) d^{3−i} θ_i, from the restored shadow
        expected = decay**3 * s4 + sum((1 - decay) * decay ** (3 - i) * module.recorded[i - 1][name]
                                       for i in range(1, 4))
        torch.testing.assert_close(resumed.shadow[name], expected)


def test_invalid_decay() -> None:
    with pytest.raises(ValueError, match="ema.decay"):
        EMA(decay=1.0)


def test_update_every_folds_steps_into_one_update(tmp_path: Path) -> None:
    """k = 3 over 7 steps: updates after steps 3, 6 and the last (7), each s ← d^m s + (1 − d^m) θ_now."""
    decay = 0.8
    module, ema = TinyModule(), EMA(decay=decay, warmup=False, update_every=3)
    expected = {n: p.detach().clone() for n, p in module.unet.state_dict().items()}
    trainer(tmp_path, 7, [ema], limit_val_batches=0).fit(module, loader())
    for step, owed in ((3, 3), (6, 3), (7, 1)):
        expected = {name: decay**owed * value + (1 - decay**owed) * module.recorded[step - 1][name]
                    for name, value in expected.items()}
    for name, value in expected.items():
        torch.testing.assert_close(ema.shadow[name], value)
    assert ema.num_updates == 7 and ema.pending == 0


def test_update_every_resumes_bit_exactly_with_steps_owed(tmp_path: Path) -> None:
    """A checkpoint taken between two updates keeps the owed steps: the resumed run equals the uninterrupted one."""
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1)).repeat(8, 1)  # one batch, 8 times: the
    batches = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)  # position in the epoch is moot

    class SaveAtStep6(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 6:
                trainer.save_checkpoint(tmp_path / "step6.ckpt")

    whole = EMA(decay=0.7, warmup=False, update_every=4)
    trainer(tmp_path / "whole", 8, [whole, SaveAtStep6()], limit_val_batches=0).fit(TinyModule(), batches)
    saved = torch.load(tmp_path / "step6.ckpt", weights_only=True)["callbacks"]["EMA"]
    assert saved["pending"] == 2 and saved["num_updates"] == 4

    resumed = EMA(decay=0.7, warmup=False, update_every=4)
    trainer(tmp_path / "resumed", 8, [resumed], limit_val_batches=0).fit(TinyModule(), batches,
                                                                        ckpt_path=tmp_path / "step6.ckpt")
    assert resumed.num_updates == whole.num_updates == 8
    for name, value in whole.shadow.items():
        assert torch.equal(resumed.shadow[name], value)


def test_export_reads_the_average_with_owed_steps_folded_in(tmp_path: Path) -> None:
    ema = EMA(decay=0.5, warmup=False, update_every=100)
    module = TinyModule()
    trainer(tmp_path, 3, [ema], limit_val_batches=0).fit(module, loader())  # the last step folds
    assert ema.pending == 0 and ema.num_updates == 3
    ema.pending = 1  # one more owed step: averaged() folds it against the current weights
    before = ema.shadow["weight"].clone()
    torch.testing.assert_close(ema.averaged()["weight"], 0.5 * before + 0.5 * module.unet.weight.detach())


def test_invalid_update_every() -> None:
    with pytest.raises(ValueError, match="ema.update_every"):
        EMA(update_every=0)

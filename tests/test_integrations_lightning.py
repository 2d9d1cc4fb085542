"""NiNo in PyTorch Lightning: the callback and configure_optimizers, gradient accumulation 2, resume.

20 optimizer steps of 2 micro-batches, period 10, ctx 5: nowcasts at steps 9 and 19, 18 AdamW
steps. Lightning passes a closure to ``optimizer.step``; NiNo calls it before and after a
nowcast, so ``training_step`` runs 40 + 2 times.
"""
from __future__ import annotations

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch", reason="needs lightning: pip install -e '.[integrations]'")

import nowcast  # noqa: E402
from nowcast.integrations import find_nino  # noqa: E402

STEPS, ACCUM, PERIOD, CTX = 20, 2, 10, 5


class Regression(pl.LightningModule):
    def __init__(self, wrap: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        self.wrap, self.training_steps, self.nino = wrap, 0, None

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        base = torch.optim.AdamW(self.parameters(), lr=1e-2)
        if not self.wrap:
            return base
        self.nino = nowcast.NiNo(self, base, nowcast.LinefitPlus(), period=PERIOD, ctx=CTX, total_steps=STEPS)
        return self.nino

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(STEPS * ACCUM * 8, 4, generator=g)
        data = torch.utils.data.TensorDataset(x, torch.stack([x[:, 0] * x[:, 1], torch.sin(x[:, 2])], 1))
        return torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)


def trainer(tmp_path, max_steps: int = STEPS, callbacks=(), **kw):
    torch.set_num_threads(1)
    return pl.Trainer(max_steps=max_steps, accumulate_grad_batches=ACCUM, accelerator="cpu", devices=1,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=list(callbacks), **kw)


def check(nino, module, t) -> None:
    assert t.global_step == STEPS
    assert nino.state["step"] == STEPS and nino.state["nowcasts"] == 2 and nino.state["nowcasts_rejected"] == 0
    assert nino.state["last_nowcast"]["step"] == 2 * PERIOD - 1
    assert {int(s["step"]) for s in nino.base_optimizer.state.values()} == {STEPS - 2}
    assert module.training_steps == STEPS * ACCUM + 2  # the closure runs again after each nowcast


def test_callback(tmp_path):
    from nowcast.integrations.lightning import NowcastCallback

    cb = NowcastCallback(nowcast.LinefitPlus(), period=PERIOD, ctx=CTX)
    module = Regression()
    t = trainer(tmp_path, callbacks=[cb])
    t.fit(module)
    assert cb.nino.schedule.total_steps == STEPS and find_nino(t.optimizers[0]) is cb.nino
    check(cb.nino, module, t)


def test_configure_optimizers_returns_nino(tmp_path):
    module = Regression(wrap=True)
    t = trainer(tmp_path)
    t.fit(module)
    check(module.nino, module, t)


def test_resume_from_a_lightning_checkpoint(tmp_path):
    """Stop at step 15 (2 states recorded), save, resume with a fresh callback: the history and
    counters come back from the checkpoint and the nowcast at step 19 happens."""
    from nowcast.integrations.lightning import NowcastCallback

    cb = NowcastCallback(nowcast.LinefitPlus(), period=PERIOD, ctx=CTX, total_steps=STEPS)
    t = trainer(tmp_path, max_steps=15, callbacks=[cb])
    t.fit(Regression())
    assert cb.nino.state["step"] == 15 and len(cb.nino.state["history"]) == 2
    ckpt = tmp_path / "at15.ckpt"
    t.save_checkpoint(ckpt)
    cb2 = NowcastCallback(nowcast.LinefitPlus(), period=PERIOD, ctx=CTX, total_steps=STEPS)
    t2 = trainer(tmp_path, callbacks=[cb2])
    t2.fit(Regression(), ckpt_path=str(ckpt))
    assert t2.global_step == STEPS
    assert cb2.nino.state["step"] == STEPS and cb2.nino.state["nowcasts"] == 2
    assert cb2.nino.state["last_nowcast"]["step"] == 2 * PERIOD - 1


def test_callback_refuses_a_second_wrapper(tmp_path):
    from nowcast.integrations.lightning import NowcastCallback

    t = trainer(tmp_path, callbacks=[NowcastCallback(nowcast.LinefitPlus(), period=PERIOD, ctx=CTX)])
    with pytest.raises(RuntimeError, match="already returned a NiNo"):
        t.fit(Regression(wrap=True))

"""PyTorch Lightning: a ``Callback`` that wraps the module's optimizer in NiNo.

    trainer = lightning.pytorch.Trainer(max_steps=10_000, callbacks=[NowcastCallback(nowcaster, period=1000)])

At ``on_fit_start`` (after ``configure_optimizers``, before a checkpoint's optimizer state is
restored) the callback replaces ``trainer.strategy.optimizers[optimizer_index]`` by
``NiNo(pl_module, that_optimizer, nowcaster, ...)`` (``DistributedNiNo`` in a multi-rank run), so
LR schedulers keep working (NiNo shares the base optimizer's ``param_groups``), checkpoints hold
NiNo's state (``fit(ckpt_path=...)`` resumes the schedule exactly), and a step is one optimizer
step (``accumulate_grad_batches`` is handled by Lightning). ``configure_optimizers`` may also return
a NiNo itself; then do not add this callback.

Lightning's automatic optimization always passes a closure (forward + backward) to
``optimizer.step``; on a nowcast step NiNo calls it before and after writing the prediction
(its safety check, see ``spike_factor``), so ``training_step`` runs twice on that step.
"""
from __future__ import annotations

from typing import Any, Optional

try:
    from lightning.pytorch import Callback
except ImportError:  # the older package name
    try:
        from pytorch_lightning import Callback
    except ImportError as e:
        raise ImportError("nowcast.integrations.lightning needs PyTorch Lightning: pip install -e '.[integrations]' "
                          "(or pip install lightning)") from e

from . import attach_nino, find_nino

__all__ = ["NowcastCallback"]


class NowcastCallback(Callback):
    """Wrap the LightningModule's optimizer in NiNo at the start of ``fit``.

    Args:
        nowcaster: any nowcaster (``nowcast.load(...)``, ``nowcast.LinefitPlus()``, ...).
        period, ctx: NiNo's schedule, in optimizer steps (``ctx=None``: the nowcaster's own).
        total_steps: default ``trainer.max_steps``, else ``trainer.estimated_stepping_batches``.
        example_inputs: for a nowcaster that needs a graph: inputs of the LightningModule's
            ``forward`` to compile it with (or pass ``graph=``).
        optimizer_index: which of ``configure_optimizers``' optimizers to wrap.
        distributed: None (DistributedNiNo when a multi-rank process group is running), True, False.
        **nino_kwargs: any other NiNo / DistributedNiNo argument (``k_schedule``, ``spike_factor``,
            ``sync``, ...).

    After ``on_fit_start``, :attr:`nino` is the wrapper.
    """

    def __init__(self, nowcaster: Any, period: Any = 1000, ctx: Optional[int] = None, total_steps: Optional[int] = None,
                 example_inputs: Any = None, optimizer_index: int = 0, distributed: Optional[bool] = None,
                 **nino_kwargs: Any) -> None:
        super().__init__()
        self.nowcaster, self.period, self.ctx, self.total_steps = nowcaster, period, ctx, total_steps
        self.example_inputs, self.optimizer_index = example_inputs, optimizer_index
        self.distributed, self.nino_kwargs = distributed, nino_kwargs
        self.nino: Any = None

    def _total_steps(self, trainer: Any) -> int:
        if self.total_steps is not None:
            return int(self.total_steps)
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        est = trainer.estimated_stepping_batches
        if est == float("inf"):
            raise ValueError("NowcastCallback needs the run's length for its schedule: set Trainer(max_steps=...) "
                             "or max_epochs, or pass NowcastCallback(total_steps=...)")
        return int(est)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = list(trainer.strategy.optimizers)
        if not 0 <= self.optimizer_index < len(optimizers):
            raise ValueError(f"NowcastCallback(optimizer_index={self.optimizer_index}) but configure_optimizers "
                             f"returned {len(optimizers)} optimizer(s)")
        base = optimizers[self.optimizer_index]
        if find_nino(base) is not None:
            raise RuntimeError("configure_optimizers already returned a NiNo wrapper; use either that or "
                               "NowcastCallback, not both")
        self.nino = attach_nino(pl_module, base, self.nowcaster, distributed=self.distributed, period=self.period,
                                ctx=self.ctx, total_steps=self._total_steps(trainer),
                                example_inputs=self.example_inputs, **self.nino_kwargs)
        optimizers[self.optimizer_index] = self.nino
        trainer.strategy.optimizers = optimizers

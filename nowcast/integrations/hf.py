"""Hugging Face: a ``TrainerCallback`` that nowcasts inside ``transformers.Trainer``.

Two ways to nowcast with the ``Trainer`` (both count a step only when the base optimizer steps,
so ``gradient_accumulation_steps`` is handled by the Trainer, which calls ``optimizer.step()``
once per accumulated batch):

1. the wrapper itself: ``Trainer(..., optimizers=(NiNo(model, AdamW(...), nowcaster, ...), None))``
   (or with your scheduler); ``accelerate``'s ``accelerator.prepare(model, nino, ...)`` takes it
   the same way, and its ``AcceleratedOptimizer`` calls ``nino.step()`` only when gradients are
   synchronised;
2. :class:`NowcastCallback`: the Trainer builds its optimizer as usual (``args.optim``,
   ``learning_rate``, ...); at ``on_train_begin`` the callback wraps that optimizer in NiNo (in
   ``DistributedNiNo`` under a multi-rank ``torch.distributed`` run).

The Trainer runs forward and backward on every step, including a nowcast step, whose gradients
are then unused (a loop of your own can skip them: ``nino.need_grads``). Checkpoints: the
Trainer's ``optimizer.pt`` is ``nino.state_dict()`` (history included), so
``trainer.train(resume_from_checkpoint=...)`` resumes the schedule exactly.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import torch
from transformers import TrainerCallback

from . import attach_nino, fast_forward, find_nino

__all__ = ["NowcastCallback"]


class NowcastCallback(TrainerCallback):
    """Wrap the Trainer's optimizer in NiNo when training begins.

    Args:
        nowcaster: any nowcaster (``nowcast.load(...)``, ``nowcast.LinefitPlus()``, ...).
        period, ctx: NiNo's schedule (``period`` counts optimizer steps, i.e. accumulated batches;
            ``ctx=None``: the nowcaster's own).
        total_steps: default ``state.max_steps`` (the Trainer's number of optimizer steps).
        example_inputs: for a nowcaster that needs a graph: inputs to compile the model with
            (a tuple of ``forward`` arguments, e.g. ``(input_ids,)``); or pass ``graph=``.
        distributed: None (DistributedNiNo when a multi-rank process group is running), True, False.
        **nino_kwargs: any other NiNo / DistributedNiNo argument (``k_schedule``, ``sync``, ...).

    After ``on_train_begin``, :attr:`nino` is the wrapper (``callback.nino.state`` has the counts).
    """

    def __init__(self, nowcaster: Any, period: Any = 1000, ctx: Optional[int] = None, total_steps: Optional[int] = None,
                 example_inputs: Any = None, distributed: Optional[bool] = None, **nino_kwargs: Any) -> None:
        self.nowcaster, self.period, self.ctx, self.total_steps = nowcaster, period, ctx, total_steps
        self.example_inputs, self.distributed, self.nino_kwargs = example_inputs, distributed, nino_kwargs
        self.nino: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Optional[torch.nn.Module] = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if model is None or optimizer is None:
            raise RuntimeError("NowcastCallback needs the Trainer's model and optimizer at on_train_begin; "
                               "add it with Trainer(callbacks=[NowcastCallback(...)])")
        if find_nino(optimizer) is not None:
            raise RuntimeError("the Trainer's optimizer is already a NiNo wrapper; use either "
                               "Trainer(optimizers=(NiNo(...), ...)) or NowcastCallback, not both")
        holder = optimizer if hasattr(optimizer, "optimizer") else None  # accelerate's AcceleratedOptimizer
        if holder is None:
            raise RuntimeError(f"NowcastCallback expects the Trainer's optimizer to be accelerate's "
                               f"AcceleratedOptimizer, got {type(optimizer).__name__}; pass "
                               "Trainer(optimizers=(nowcast.NiNo(model, base, nowcaster, ...), None)) instead")
        base = holder.optimizer
        total = self.total_steps if self.total_steps is not None else int(state.max_steps)
        self.nino = attach_nino(model, base, self.nowcaster, distributed=self.distributed, period=self.period,
                                ctx=self.ctx, total_steps=total, example_inputs=self.example_inputs,
                                **self.nino_kwargs)
        holder.optimizer = self.nino
        if state.global_step > 0:
            self._resume(args, state)

    def _resume(self, args: Any, state: Any) -> None:
        """Restore NiNo's state from the checkpoint the Trainer resumed from, if it has it."""
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", "optimizer.pt")
        saved = torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) else None
        if saved is not None and "nino" in saved:
            self.nino.load_state_dict(saved)
            return
        start = fast_forward(self.nino, state.global_step)
        warnings.warn(f"NowcastCallback: resumed at step {state.global_step} without NiNo's saved state ({path} has "
                      f"none); nowcasting restarts with the cycle at step {start}", RuntimeWarning, stacklevel=2)

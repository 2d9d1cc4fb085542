"""Integrations with training frameworks; each module imports its framework lazily.

- :mod:`nowcast.integrations.hf`: ``NowcastCallback`` for the Hugging Face ``Trainer`` (needs
  ``transformers``); the ``NiNo`` wrapper itself also goes through ``Trainer(optimizers=...)`` and
  ``accelerate``'s ``accelerator.prepare`` unchanged.
- :mod:`nowcast.integrations.lightning`: ``NowcastCallback`` for PyTorch Lightning (needs
  ``lightning``).

Install them with ``pip install -e ".[integrations]"``. :func:`find_nino` finds the NiNo inside
framework wrappers (``AcceleratedOptimizer``, ``LightningOptimizer``), e.g. to read ``need_grads``.
"""
from __future__ import annotations

from typing import Any, Optional

__all__ = ["find_nino", "attach_nino"]


def find_nino(optimizer: Any) -> Optional[Any]:
    """The :class:`nowcast.NiNo` inside ``optimizer`` (itself, or behind ``.optimizer`` /
    ``._optimizer`` wrapper attributes), or None."""
    from ..optim import NiNo

    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, NiNo):
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
    return None


def attach_nino(model: Any, base_optimizer: Any, nowcaster: Any, distributed: Optional[bool] = None,
                **kwargs: Any) -> Any:
    """``NiNo(model, base_optimizer, nowcaster, **kwargs)``, or ``DistributedNiNo`` when a
    ``torch.distributed`` process group with more than one rank is running (``distributed=None``)
    or when asked (``distributed=True``; ``sync``, ``src``, ``verify`` go to it)."""
    import torch.distributed as dist

    from ..optim import NiNo

    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        from ..distributed import DistributedNiNo

        return DistributedNiNo(model, base_optimizer, nowcaster, **kwargs)
    extra = sorted(k for k in ("sync", "src", "group", "verify") if k in kwargs)
    if extra:
        raise ValueError(f"{extra} only apply to DistributedNiNo (a multi-rank torch.distributed run); "
                         "drop them or pass distributed=True inside an initialized process group")
    return NiNo(model, base_optimizer, nowcaster, **kwargs)


def fast_forward(nino: Any, step: int) -> int:
    """Set a fresh NiNo to continue a run at ``step`` without its saved state: base steps until
    the next cycle of the schedule starts, nowcasting from there. Returns that cycle's start."""
    st = nino.state
    st["step"] = int(step)
    if nino.schedule is None:
        return int(step)
    start, cycle = 0, 0
    while start < step:
        start += nino.schedule.length(cycle, start)
        cycle += 1
    st.update(cycle=cycle, cycle_start=start, history=[])
    return start

"""Mean aggregation of edge messages at their target nodes, with a switchable backend.

- ``"native"``: ``index_add_`` of the messages, divided by the in-degree (``bincount``), clamped
  at 1 so that a node without incoming edges gets zeros. Pure torch, any device.
- ``"torch_scatter"``: ``torch_scatter.scatter_mean`` (the `scatter` extra), same definition.

The default is ``"torch_scatter"`` when it imports and ``"native"`` otherwise; ``set_backend`` or
the ``NOWCAST_SCATTER`` environment variable (``native`` / ``torch_scatter``) override it.
"""
from __future__ import annotations

import importlib
import os

import torch

BACKENDS = ("native", "torch_scatter")
_backend: str | None = None


def has_torch_scatter() -> bool:
    try:
        importlib.import_module("torch_scatter")
    except Exception:  # ImportError, or a binary built for another torch (OSError/RuntimeError)
        return False
    return True


def get_backend() -> str:
    global _backend
    if _backend is None:
        env = os.environ.get("NOWCAST_SCATTER")
        if env:
            set_backend(env)
        else:
            _backend = "torch_scatter" if has_torch_scatter() else "native"
    return _backend


def set_backend(name: str) -> None:
    """Choose ``"native"`` or ``"torch_scatter"`` for every later aggregation."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown scatter backend {name!r}; choose one of {BACKENDS}")
    if name == "torch_scatter" and not has_torch_scatter():
        raise ImportError("torch_scatter is not installed (pip install 'neural-nowcasting[scatter]'); "
                          "use set_backend('native')")
    _backend = name


def in_degree(index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """(num_nodes,) float in-degree, clamped at 1 (the divisor of a mean)."""
    return torch.bincount(index, minlength=num_nodes).clamp_(min=1).to(torch.float32)


def scatter_mean(src: torch.Tensor, index: torch.Tensor, num_nodes: int, backend: str | None = None,
                 degree: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the rows of ``src`` (E, D) grouped by ``index`` (E,) into (num_nodes, D).

    ``degree`` (from :func:`in_degree`) may be passed to reuse it across layers (native backend).
    """
    backend = backend or get_backend()
    if backend == "torch_scatter":
        import torch_scatter

        return torch_scatter.scatter_mean(src, index, dim=0, dim_size=num_nodes)
    if backend != "native":
        raise ValueError(f"unknown scatter backend {backend!r}; choose one of {BACKENDS}")
    out = src.new_zeros(num_nodes, src.shape[1]).index_add_(0, index, src)
    deg = in_degree(index, num_nodes) if degree is None else degree
    return out / deg.to(out.dtype)[:, None]

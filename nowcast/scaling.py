"""Scaling of parameter states before a nowcast, and its exact inverse.

Every method is an affine map per row, ``scaled = (w - shift) / div``, and :func:`unscale` computes
``scaled * div + shift`` with the same ``shift`` and ``div``: the inverse is exact up to one float
rounding per operation. ``unscale(..., exact=False)`` multiplies by ``div - eps`` instead (the
spread without the epsilon), which is what the published NiNo implementation does when it maps a
prediction back; the nowcasters use it so that the published checkpoints give the published
numbers (the two differ by ``eps * |scaled value|``, a few 1e-6 on real trajectories). It also
returns a constant tensor's value exactly.

Methods (``eps = 1e-6``):
- ``"std"`` (default, the published NiNo models): per parameter *tensor*, the mean and the unbiased
  std over all its values in all ``ctx`` states; ``div = std + eps``. A tensor with a single value
  in total gets std 0.
- ``"std-param"``: per parameter *element*, mean and unbiased std over its ``ctx`` values; the std
  is floored at 1e-2 (as in the published code) so that an element that barely moves is not
  blown up; ``div = max(std, 1e-2) + eps``.
- ``"minmax-param"``: per element, ``shift = min`` and ``div = max(max - min, 1e-2) + eps`` over its
  ``ctx`` values, so the states lie in [0, 1]. (The published ``min-max-param`` divides by the range
  without subtracting the minimum; ours is the usual min-max.)
- ``"none"``: identity (``shift = 0``, ``div = 1``).

Tensor boundaries come from ``graph.blocks`` (one block per parameter, ``offset``/``numel``) or,
without a graph, from a list of tensor sizes.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

METHODS = ("std", "std-param", "minmax-param", "none")
EPS = 1e-6
MIN_SPREAD = 1e-2


class Scales(NamedTuple):
    """``shift`` and ``div`` per row (``sizes`` None) or per tensor (expanded by ``sizes``)."""

    shift: torch.Tensor
    div: torch.Tensor
    sizes: tuple[int, ...] | None = None
    eps: float = EPS

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(num_params, 1) shift and div."""
        if self.sizes is None:
            return self.shift, self.div
        n = torch.tensor(self.sizes, device=self.shift.device)
        return self.shift.repeat_interleave(n)[:, None], self.div.repeat_interleave(n)[:, None]


def sizes_of(graph_or_sizes) -> list[int]:
    """Tensor sizes from a NeuralGraph (its blocks) or a list of sizes."""
    if hasattr(graph_or_sizes, "param_sizes"):  # a block may cover part of a tensor (fused q/k/v)
        return list(graph_or_sizes.param_sizes)
    sizes = [int(s) for s in graph_or_sizes]
    if any(s <= 0 for s in sizes):
        raise ValueError(f"tensor sizes must be positive, got {sizes}")
    return sizes


def scale(states: torch.Tensor, graph_or_sizes, method: str = "std",
          eps: float = EPS) -> tuple[torch.Tensor, Scales]:
    """Scale ``states`` (num_params, T); return the scaled states and the :class:`Scales`."""
    if method not in METHODS:
        raise ValueError(f"unknown scaling method {method!r}; choose one of {METHODS}")
    if states.dim() != 2:
        raise ValueError(f"states must be (num_params, T), got {tuple(states.shape)}")
    sizes = sizes_of(graph_or_sizes)
    if sum(sizes) != states.shape[0]:
        raise ValueError(f"tensor sizes add up to {sum(sizes)} but states has {states.shape[0]} rows")
    if method == "none":
        one = states.new_ones(len(sizes))
        return states.clone(), Scales(one * 0, one, tuple(sizes), 0.0)
    if method == "std":
        shift = states.new_empty(len(sizes))
        div = states.new_empty(len(sizes))
        out = torch.empty_like(states)
        off = 0
        for i, n in enumerate(sizes):
            w = states[off: off + n]
            shift[i] = w.mean()
            div[i] = (w.std() if w.numel() > 1 else w.new_zeros(())) + eps
            torch.div(w - shift[i], div[i], out=out[off: off + n])
            off += n
        return out, Scales(shift, div, tuple(sizes), eps)
    if method == "std-param":
        shift = states.mean(1, keepdim=True)
        spread = states.std(1, keepdim=True) if states.shape[1] > 1 else torch.zeros_like(shift)
    else:  # minmax-param
        shift = states.amin(1, keepdim=True)
        spread = states.amax(1, keepdim=True) - shift
    div = spread.clamp(min=MIN_SPREAD) + eps
    return (states - shift) / div, Scales(shift, div, None, eps)


def unscale(values: torch.Tensor, scales: Scales, exact: bool = True) -> torch.Tensor:
    """Inverse of :func:`scale`: ``values * div + shift``; values (num_params,) or (num_params, T).

    ``exact=False``: ``values * (div - eps) + shift``, the published implementation's unscale.
    """
    shift, div = scales.rows()
    if not exact:
        div = div - scales.eps
    if values.dim() == 1:
        return values * div[:, 0] + shift[:, 0]
    return values * div + shift


"""The nowcaster interface shared by NiNo, WNN+, Linefit and Linefit+.

A nowcaster maps ``ctx`` past parameter states of a model to its parameters ``k`` states ahead:

    predict(graph, states, k) -> (num_params,) float32

- ``graph``: a :class:`neugraph.NeuralGraph` from ``neugraph.compile(model, x, profile="nino")``, or
  ``None`` for nowcasters whose ``needs_graph`` is False.
- ``states``: (num_params, ctx), oldest first, rows in ``graph.param_names`` order (the order of
  ``named_parameters()``, tied parameters once). Any float dtype; computed in float32.
- ``k``: the horizon, an integer 1 <= k <= ``max_horizon``, in units of the spacing between two
  states (a float such as 2.5 is refused rather than rounded).

The result is float32, on the nowcaster's device (on the states' device for Linefit/Linefit+).

Frozen parameters (``Block.trainable`` False) are returned at their newest value.

``embed(graph, states)`` returns one vector summarising the model's recent trajectory (the paper
uses the GNN's mean edge state after the last layer to analyse trajectories); what it means for
each nowcaster is documented on the nowcaster.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import torch
import torch.nn as nn


class Nowcaster(nn.Module):
    """Base class: input checks and the shared frozen-parameter rule."""

    needs_graph: bool = True
    ctx: int = 5
    max_horizon: int = 40

    def predict(self, graph, states: torch.Tensor, k: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def embed(self, graph, states: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} has no trajectory embedding")

    @property
    def config(self) -> dict:
        """The constructor arguments, JSON-serialisable (used by :func:`nowcast.save`)."""
        return dict(self._config)

    # ---- shared checks -------------------------------------------------------------------------
    def check(self, graph, states: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Validate the inputs; return ``states`` as float32 on this module's device."""
        if graph is None and self.needs_graph:
            raise ValueError(f"{type(self).__name__} needs a graph: pass "
                             "neugraph.compile(model, example_inputs, profile='nino')")
        if not isinstance(states, torch.Tensor) or states.dim() != 2:
            shape = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
            raise ValueError(f"states must be a (num_params, ctx={self.ctx}) tensor, oldest state first; "
                             f"got {shape}")
        if self.ctx and states.shape[1] != self.ctx:
            raise ValueError(f"states has {states.shape[1]} columns but {type(self).__name__} takes "
                             f"ctx={self.ctx} past states (num_params, {self.ctx}), oldest first")
        if graph is not None and states.shape[0] != graph.num_params:
            raise ValueError(f"states has {states.shape[0]} rows but the graph has {graph.num_params} "
                             "parameters (rows must follow graph.param_names)")
        if k is not None:
            check_horizon(k, self.max_horizon)
        if not states.is_floating_point():
            raise ValueError(f"states must be a floating-point tensor, got {states.dtype}")
        return states.to(device=self._device(states.device), dtype=torch.float32)

    def _device(self, default: torch.device | None = None) -> torch.device:
        """Where the weights live (``default``, else CPU, for a nowcaster without weights)."""
        p = next(iter(self.parameters()), None)
        return p.device if p is not None else (default or torch.device("cpu"))


def check_horizon(k, max_horizon: int) -> int:
    """``k`` must be an integer in 1..max_horizon."""
    if isinstance(k, torch.Tensor) and k.numel() == 1 and not k.is_floating_point():
        k = k.item()
    if isinstance(k, numbers.Integral) and not isinstance(k, bool):  # also numpy integers
        k = int(k)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= max_horizon:
        raise ValueError(f"horizon k must be an integer in 1..{max_horizon}, got {k!r}")
    return k


def keep_frozen(graph, states: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Put the newest state back into the rows of frozen parameters (they do not move)."""
    if graph is None or all(b.trainable for b in graph.blocks):
        return pred
    frozen = ~graph.trainable_mask.to(pred.device)
    pred[frozen] = states[frozen, -1].to(pred.dtype)
    return pred


def tensor_sizes(graph) -> list[int]:
    """numel of every parameter tensor, in flat order."""
    return list(graph.param_sizes)


def param_types(graph, device=None) -> torch.Tensor:
    """(num_params,) long: the edge type of each parameter element (fused q/k/v slices differ)."""
    return graph.element_types().to(device)

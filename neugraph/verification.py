"""Verification: check an inferred symmetry group and its compiled graph against the module itself.

Checks (each counted in the report):
- good: permutations drawn from the inferred group, applied to parameters and buffers, keep the
  outputs equal in float64 (relative error at most ``rtol``);
- equivariance: the graph compiled from the permuted model equals the original graph with its
  nodes relabelled (same edges, types, features and node labels, exactly);
- bad: permutations outside the group change the outputs and the graph's WL hash;
- coverage: the group's size, compared with a known group when one is given;
- round trip: parameters -> edge features -> parameters is exact.
LPE node features are not compared under relabelling: eigenvectors of repeated eigenvalues have no
canonical basis (the published model is trained with random sign flips for the same reason).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .emit import emit
from .ir import ModelIR, Permutation
from .wl import graph_hash


@dataclass
class Report:
    ok: bool
    counts: dict[str, list[int]]  # check -> [passed, run]
    max_good_error: float
    min_bad_change: float
    group: dict[str, Any]
    method: str
    profile: str
    failures: list[str] = field(default_factory=list)
    diagnostics: list[Any] = field(default_factory=list)
    rtol: float = 1e-9
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"rtol": self.rtol, "notes": self.notes,
            "ok": self.ok, "counts": self.counts, "max_good_error": self.max_good_error,
            "min_bad_change": self.min_bad_change, "group": self.group, "method": self.method,
            "profile": self.profile, "failures": self.failures,
            "diagnostics": [d.__dict__ for d in self.diagnostics],
        }

    def __str__(self) -> str:
        lines = [f"verify: {'OK' if self.ok else 'FAILED'} (capture: {self.method}, profile: {self.profile})"]
        for k, (p, n) in self.counts.items():
            lines.append(f"  {k:<13} {p}/{n}")
        lines.append(f"  max relative output error under good permutations: {self.max_good_error:.3g}")
        if self.min_bad_change == self.min_bad_change and self.min_bad_change != float("inf"):
            lines.append(f"  min relative output change under bad permutations: {self.min_bad_change:.3g}")
        g = self.group
        lines.append(f"  group: free spaces {g['free_spaces']}, lane groups {g['lane_groups']}, "
                     f"log|G| = {g['log_order']:.1f}")
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.extend(f"  FAIL {f}" for f in self.failures)
        return "\n".join(lines)


def _to64(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_to64(v) for v in x)
    if isinstance(x, dict):
        return {k: _to64(v) for k, v in x.items()}
    return x


def _outputs(out: Any) -> torch.Tensor:
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    if hasattr(out, "to_tuple"):
        leaves = [t for t in out.to_tuple() if isinstance(t, torch.Tensor)]
    return torch.cat([t.detach().double().reshape(-1) for t in leaves if t.is_floating_point()])


_DROPOUTS = ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout")


@contextlib.contextmanager
def _without_dropout():
    """Dropout as the identity while outputs are compared: a random mask follows positions, not
    neurons, so it would make a true symmetry look broken."""
    import torch.nn.functional as F

    saved = {name: getattr(F, name) for name in _DROPOUTS}
    saved_torch = torch.dropout
    try:
        for name in _DROPOUTS:
            setattr(F, name, lambda x, *a, **k: x)
        torch.dropout = lambda x, *a, **k: x
        yield
    finally:
        for name, fn in saved.items():
            setattr(F, name, fn)
        torch.dropout = saved_torch


# relative tolerance for a model that computes part of its forward in a lower precision even on a
# float64 copy (e.g. Hugging Face RMSNorm upcasts to float32): reordering a sum then moves results
# by that precision's rounding, while a bad permutation moves them by orders of magnitude more.
_LOW_PRECISION_RTOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def _lowest_precision(model: torch.nn.Module, args: tuple, kwargs: dict) -> torch.dtype | None:
    """The lowest floating dtype any op produces while the float64 model runs (None if all float64)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: set = set()

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            out = func(*a, **(kw or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                    seen.add(t.dtype)
            return out

    with torch.no_grad(), Watch():
        model(*args, **kwargs)
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        if dt in seen:
            return dt
    return None


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (tied ones once; ``functional_call`` ties the other names). Unlike
    ``state_dict()`` this includes non-persistent buffers (e.g. a rotary ``inv_freq``), which a
    permutation may need to move."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {k: v.detach().clone() for k, v in named}


def _run(model: torch.nn.Module, state: dict, args: tuple, kwargs: dict) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad(), _without_dropout():
        return _outputs(torch.func.functional_call(model, state, args, kwargs))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _flat_state(graph, state: dict) -> torch.Tensor:
    return torch.cat([state[n].detach().reshape(-1) for n in graph.param_names])


def node_map(graph, perm: Permutation) -> np.ndarray:
    """phi[old node] = new node: where each neuron of the original graph sits after ``perm``."""
    sp = perm.ir.spaces
    phi = np.arange(graph.num_nodes)
    space = graph.node_space.numpy()
    starts: dict[int, int] = {}
    for v, s in enumerate(space):
        if s >= 0 and s not in starts:
            starts[int(s)] = v
    for leaf, start in starts.items():
        src = sp.find(perm.relabel.get(leaf, leaf))
        p = perm.leaf_perm(leaf)
        phi[starts[src] + p] = start + np.arange(len(p))
    return phi


def _canon(ei: np.ndarray, et: np.ndarray, ef: np.ndarray) -> np.ndarray:
    rows = np.concatenate([ei.T.astype(np.float64), et[:, None].astype(np.float64), ef.astype(np.float64)], 1)
    order = np.lexsort(rows.T[::-1])
    return rows[order]


def equivariant(graph, graph_perm, perm: Permutation, flat: torch.Tensor, flat_perm: torch.Tensor) -> str | None:
    """None if ``graph_perm`` equals ``graph`` relabelled by ``perm``, else what differs."""
    if graph.num_nodes != graph_perm.num_nodes or graph.num_edges != graph_perm.num_edges:
        return "graph sizes differ"
    phi = node_map(graph, perm)
    if sorted(phi.tolist()) != list(range(graph.num_nodes)):
        return "node map is not a bijection"
    ei = phi[graph.edge_index.numpy()]
    a = _canon(ei, graph.edge_type.numpy(), graph.edge_features(flat).numpy())
    b = _canon(graph_perm.edge_index.numpy(), graph_perm.edge_type.numpy(), graph_perm.edge_features(flat_perm).numpy())
    if not np.array_equal(a, b):
        return "edges, types or features differ after relabelling"
    lab = np.empty_like(graph.node_labels.numpy())
    lab[phi] = graph.node_labels.numpy()
    if not np.array_equal(lab, graph_perm.node_labels.numpy()):
        return "node labels differ after relabelling"
    return None


def verify(module: torch.nn.Module, example_inputs: Any, trials: int = 16, *, profile: str = "generic",
           known_group: dict | None = None, rtol: float = 1e-9, seed: int = 0, kwargs: dict | None = None,
           model_ir: ModelIR | None = None, randomize: bool = True, auto_rtol: bool = True,
           progress: bool = False) -> Report:
    """Verify ``module``'s inferred symmetry and compiled graph (see the module docstring).

    ``known_group`` may give ``free_spaces`` (sorted sizes) and ``lane_groups`` (sorted counts) of
    the group the architecture is known to have; coverage then requires equality. With
    ``randomize`` (default) the checks run on a float64 copy whose parameters get small random
    offsets, so that an initial value such as an all-ones norm weight cannot hide a bad permutation;
    the caller's module is never modified. A model that computes part of its forward in a lower
    precision even on a float64 copy gets that precision's tolerance, reported in the notes, unless
    ``auto_rtol`` is False. ``progress`` shows a progress bar (stderr) over the ``2 * trials``
    permutation checks.
    """
    from . import trace

    model = copy.deepcopy(module).double()
    for m in model.modules():
        if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.AlphaDropout)):
            m.p = 0.0
    if randomize:  # break coincidental symmetries of initial values (all-ones norm weights, zero biases)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    args = _to64(example_inputs if isinstance(example_inputs, tuple) else (example_inputs,))
    kw = _to64(dict(kwargs or {}))
    ir = model_ir or trace(model, args, kw)
    graph = emit(ir, profile=profile, lpe=0)
    state = _state(model)
    gen = torch.Generator().manual_seed(seed)
    base = _run(model, state, args, kw)
    notes: list[str] = []
    low = _lowest_precision(model, args, kw)
    if auto_rtol and low is not None and rtol < _LOW_PRECISION_RTOL[low]:
        rtol = _LOW_PRECISION_RTOL[low]
        notes.append(f"the model computes part of its forward in {str(low).replace('torch.', '')} even on a "
                     f"float64 copy; outputs are compared with relative tolerance {rtol:g}")
    flat = _flat_state(graph, state)
    counts = {"good": [0, 0], "equivariance": [0, 0], "bad": [0, 0], "coverage": [0, 0], "round_trip": [0, 0]}
    failures: list[str] = []
    max_err, min_change = 0.0, float("inf")
    base_hash = graph_hash(graph, flat)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * trials, desc="verify", unit="perm", dynamic_ncols=True)
    for t in range(trials):
        perm = ir.sample_symmetry(gen)
        new_state = perm.apply(state)
        out = _run(model, new_state, args, kw)
        err = _rel(out, base)
        max_err = max(max_err, err)
        counts["good"][1] += 1
        if err <= rtol:
            counts["good"][0] += 1
        else:
            failures.append(f"good permutation changed outputs by {err:.3g} relative")
        flat_perm = _flat_state(graph, new_state)
        graph_perm = emit(trace(model, args, kw), profile=profile, lpe=0) if t == 0 else graph
        why = equivariant(graph, graph_perm, perm, flat, flat_perm)
        counts["equivariance"][1] += 1
        if why is None:
            counts["equivariance"][0] += 1
        else:
            failures.append(f"equivariance: {why}")
        if bar is not None:
            bar.update(1)
    for t in range(trials):
        bad = ir.sample_violation(gen)
        if bad is None:
            if bar is not None:  # no permutation outside the group: nothing left to check
                bar.total = bar.n
            break
        new_state = bad.apply(state)
        out = _run(model, new_state, args, kw)
        change = _rel(out, base)
        min_change = min(min_change, change)
        h = graph_hash(graph, _flat_state(graph, new_state))
        counts["bad"][1] += 1
        if change > rtol and h != base_hash:  # a bad permutation must move the outputs past rtol
            counts["bad"][0] += 1
        else:
            failures.append(f"bad permutation ({bad.kind}): output change {change:.3g}, "
                            f"hash {'unchanged' if h == base_hash else 'changed'}")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    group = ir.group_summary()
    counts["coverage"][1] = 1
    if known_group is None:
        counts["coverage"][0] = 1
    else:
        want = {"free_spaces": sorted(known_group.get("free_spaces", [])),
                "lane_groups": sorted(known_group.get("lane_groups", []))}
        got = {"free_spaces": group["free_spaces"], "lane_groups": group["lane_groups"]}
        if want == got:
            counts["coverage"][0] = 1
        else:
            failures.append(f"coverage: inferred {got}, known {want}")
    counts["round_trip"][1] = 1
    if torch.equal(graph.to_params(graph.edge_features(flat)[:, : graph.max_feat]), flat):
        counts["round_trip"][0] = 1
    else:
        failures.append("round trip parameters -> edge features -> parameters is not exact")
    ok = all(p == n for p, n in counts.values())
    return Report(ok, counts, max_err, min_change, group, ir.method, profile, failures, ir.diagnostics(),
                  rtol, notes)

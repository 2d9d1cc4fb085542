"""Meta-training of the NiNo GNN (:class:`nowcast.NiNoGNN`) on collected training trajectories.

The procedure, its defaults and the commands are in ``docs/metatrain.md``. In short:

- a *trajectory store* ``<root>/<task>/`` holds ``states.f16`` (a float16 memmap of shape
  ``(runs, n_saves, num_params)``, save 0 = the initial parameters, one save every ``save_every``
  steps, rows in ``graph.param_names`` order) and ``meta.json`` (``num_params``, ``param_names``,
  ``save_every``, ``n_saves``, ``runs``, ``done`` = complete saves per run, ...);
- a *window* is ``ctx`` states spaced ``period / ctx`` steps apart (``stride`` saves) at a random
  run and position; its *targets* are the states ``k = 1 .. K`` spacings after the newest window
  state, masked where the run has no such save (``k`` is the horizon of ``Nowcaster.predict``);
- the loss of a window is the mean absolute error, in the scaled space of
  :func:`nowcast.scaling.scale` (the inference scaling), between ``scaled[:, -1] + delta_k`` (all
  horizons from one forward pass of the same :class:`~nowcast.NiNoGNN` code as inference) and the
  targets scaled with the window's own shift and divisor, over the parameters the nowcaster can
  move and the valid horizons; a batch's loss is the mean over its windows (several tasks may
  mix);
- AdamW with (optional warm-up and) cosine decay, gradient-norm clipping, bf16 autocast on CUDA,
  a step with a non-finite loss or gradient is skipped and counted, checkpoints with everything
  needed for an exact resume, a JSON-lines log, a PNG of the curves, a held-out validation loss.

``python -m nowcast.metatrain --help`` is the command line.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import save as save_nowcaster
from .collect import load_trajectories
from .gnn import NiNoGNN
from .heads import MLPHead
from .scaling import scale

META_FILE = "meta.json"
CKPT_DIR, LOG_FILE, PLOT_FILE, CONFIG_FILE, SUMMARY_FILE = "checkpoints", "log.jsonl", "loss.png", "config.json", \
    "summary.json"
NOWCASTER_DIR = "nowcaster"


class MetaTrainError(ValueError):
    """A store, task or configuration the meta-trainer cannot use, with the reason and the fix."""


# ---- trajectory stores -----------------------------------------------------------------------------
def open_store(path: str | Path) -> tuple[np.ndarray, dict, list[int]]:
    """(states memmap (runs, n_saves, num_params) float16, meta dict, complete run ids) of a store.

    ``path`` is a ``<root>/<task>`` directory written by ``python -m nowcast.collect``; it is read
    with :func:`nowcast.collect.load_trajectories`.
    """
    path = Path(path)
    if not (path / META_FILE).exists():
        raise MetaTrainError(f"{path}: no trajectory store here (no {META_FILE}); collect one with "
                             "`python -m nowcast.collect --task TASK --out DIR` and pass --data DIR")
    t = load_trajectories(path)
    return t.states, t.meta, list(t.complete_runs)


def _done_counts(meta: dict, runs: int, n_saves: int, where: Path) -> np.ndarray:
    done = meta.get("done")
    if done is None:
        raise MetaTrainError(f"{where}: meta.json has no per-run 'done' counts; the store was not written by the "
                             "collector (or is too old): recollect it")
    if isinstance(done, dict):  # {"run": count}
        done = [done.get(str(r), 0) for r in range(runs)]
    done = np.asarray(done, dtype=np.int64)
    if done.shape != (runs,) or (done < 0).any() or (done > n_saves).any():
        raise MetaTrainError(f"{where}: 'done' must list, per run, how many of the {n_saves} saves are complete")
    return done


# ---- tasks -----------------------------------------------------------------------------------------
@dataclass
class TrajectoryTask:
    """One task's trajectories with its compiled graph and sampling geometry.

    ``stride`` is the number of saves between two window states (``period / ctx / save_every``);
    ``train_runs`` / ``val_runs`` are the run ids usable for training / validation (runs with at
    least one complete window and one target). ``columns`` (None: all) are the entries of a stored
    state that form the state of ``graph``'s model (a vocabulary sample, see :func:`vocab_columns`).
    """

    name: str
    graph: Any
    states: np.ndarray
    done: np.ndarray
    save_every: int
    stride: int
    ctx: int
    horizon: int
    train_runs: np.ndarray
    val_runs: np.ndarray
    ir: Any = None
    trainable: torch.Tensor = field(default=None, repr=False)
    flat_ids: dict | None = field(default=None, repr=False)
    param_map: "ParamMap | None" = field(default=None, repr=False)
    columns: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_params(self) -> int:
        return int(self.states.shape[2]) if self.columns is None else len(self.columns)

    def newest_range(self, run: int) -> tuple[int, int]:
        """Inclusive range of the newest window save for ``run`` that leaves at least one target."""
        return (self.ctx - 1) * self.stride, int(self.done[run]) - 1 - self.stride


def window_stride(period: int, ctx: int, save_every: int) -> int:
    """Saves between two window states: ``period / ctx / save_every``, which must be whole."""
    if period <= 0 or ctx <= 0 or save_every <= 0:
        raise MetaTrainError(f"period ({period}), ctx ({ctx}) and save_every ({save_every}) must be positive")
    if period % ctx or (period // ctx) % save_every:
        raise MetaTrainError(f"period {period} / ctx {ctx} must be a whole multiple of the store's save_every "
                             f"({save_every} steps); choose --period as a multiple of {ctx * save_every}")
    return period // ctx // save_every


def load_task(name: str, store: str | Path, graph, *, period: int = 1000, ctx: int = 5, horizon: int = 40,
              val_fraction: float = 0.1, ir=None, max_runs: int | None = None,
              columns: np.ndarray | None = None) -> TrajectoryTask:
    """Open ``store`` (a ``<root>/<task>`` directory) for meta-training on ``graph``.

    ``max_runs``: use only the store's first ``max_runs`` runs (a store still being collected one
    run after another: its first complete runs are exactly what ``collect --runs max_runs`` makes).

    ``graph`` is ``neugraph.compile(model, example_inputs, profile="nino")`` of the task's model;
    ``ir`` (``neugraph.trace`` of the same model) enables permutation augmentation. The last
    ``val_fraction`` of the runs (at least one when there are two or more) are held out.
    ``columns``: ``graph`` is of a smaller model whose state is these entries of a stored state
    (:func:`vocab_columns`); windows read only them.
    """
    store = Path(store)
    states, meta, _complete = open_store(store)
    runs, n_saves, num_params = (int(s) for s in states.shape)
    all_runs = runs
    if max_runs is not None:
        if not 1 <= max_runs <= runs:
            raise MetaTrainError(f"{store}: max_runs={max_runs} but the store has {runs} runs")
        runs = max_runs
    if meta.get("task") not in (None, name):
        raise MetaTrainError(f"{store}: the store holds task {meta['task']!r}, not {name!r}; check --data/--tasks")
    if columns is not None:
        columns = np.asarray(columns, dtype=np.int64)
        if len(columns) != graph.num_params or columns.min(initial=0) < 0 or columns.max(initial=0) >= num_params:
            raise MetaTrainError(f"{store}: {len(columns)} columns for a graph of {graph.num_params} parameters, from "
                                 f"states of {num_params}; build them with vocab_columns for this store's model")
    elif num_params != graph.num_params:
        raise MetaTrainError(f"{store}: {num_params} parameters per state but the graph of task {name!r} has "
                             f"{graph.num_params}; the store was collected for another model: recollect it")
    names = meta.get("param_names")
    if names is not None and list(names) != list(graph.param_names):
        raise MetaTrainError(f"{store}: the store's param_names differ from the graph's param_names order; states "
                             "must be flat in graph.param_names (named_parameters()) order: recollect the store")
    done = _done_counts(meta, all_runs, n_saves, store)[:runs]
    stride = window_stride(period, ctx, int(meta["save_every"]))
    usable = np.flatnonzero(done >= ctx * stride + 1)  # a full window and one target
    n_val = 0 if runs < 2 else max(1, int(round(val_fraction * runs))) if val_fraction > 0 else 0
    val_ids = set(range(runs - n_val, runs))
    train = np.array([r for r in usable if r not in val_ids], dtype=np.int64)
    val = np.array([r for r in usable if r in val_ids], dtype=np.int64)
    if len(train) == 0:
        need = ((ctx - 1) * stride + 1 + stride) * int(meta["save_every"])
        raise MetaTrainError(f"{store}: no training run has a full window and a target (needs {need} collected "
                             f"steps at period {period}); collect longer runs or choose a smaller --period")
    _ = graph.edge_index, graph.edge_type  # materialise once; shallow copies (LPE sign flips) share them
    return TrajectoryTask(name=name, graph=graph, states=states, done=done, save_every=int(meta["save_every"]),
                    stride=stride, ctx=ctx, horizon=horizon, train_runs=train, val_runs=val, ir=ir,
                    trainable=graph.trainable_mask, param_map=ParamMap.of(graph), columns=columns)


# ---- windows ---------------------------------------------------------------------------------------
@dataclass
class Window:
    """One training example: ``states`` (P, ctx) oldest first, ``targets`` (P, K), ``mask`` (K,).

    ``task`` indexes the task list; ``run``/``newest`` say where it came from; ``lpe_sign`` (lpe,)
    flips LPE columns (None: as compiled).
    """

    task: int
    run: int
    newest: int
    states: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    lpe_sign: torch.Tensor | None = None


def window_saves(newest: int, stride: int, ctx: int) -> np.ndarray:
    """Save indices of a window whose newest state is save ``newest``, oldest first."""
    return newest - stride * np.arange(ctx - 1, -1, -1)


def target_saves(newest: int, stride: int, horizon: int) -> np.ndarray:
    """Save indices of the targets at horizons 1..horizon (some may lie past the trajectory)."""
    return newest + stride * np.arange(1, horizon + 1)


def read_windows(task: TrajectoryTask, run: int, newest: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor]]:
    """(states (P, ctx), targets (P, K), mask (K,)) float32 for windows of ``run`` ending at ``newest``.

    ``newest`` must be equally spaced by ``stride`` (windows shifted by one spacing), so one read
    of the memmap serves all of them. Targets past ``done[run]`` or not finite are masked (and set
    to the newest state, so that masked entries are finite).
    """
    ctx, s, K = task.ctx, task.stride, task.horizon
    first, last_needed = newest[0] - (ctx - 1) * s, newest[-1] + K * s
    last = min(last_needed, int(task.done[run]) - 1)
    saves = np.arange(first, last + 1, s)
    block = np.asarray(task.states[run, saves])
    if task.columns is not None:
        block = block[:, task.columns]
    block = torch.from_numpy(block.astype(np.float32)).t().contiguous()  # (P, n)
    finite = torch.isfinite(block).all(0)
    out = []
    for j in range(len(newest)):
        win = block[:, j: j + ctx]
        tgt = win[:, -1:].repeat(1, K)
        mask = torch.zeros(K, dtype=torch.bool)
        avail = block[:, j + ctx: j + ctx + K]
        n = avail.shape[1]
        tgt[:, :n] = avail
        mask[:n] = finite[j + ctx: j + ctx + n]
        tgt[:, ~mask] = win[:, -1:]
        out.append((win.clone(), tgt, mask))
    return out


def flat_permutation(task: TrajectoryTask, generator: torch.Generator) -> torch.Tensor:
    """A random element of the model's neuron-permutation group as an index into the flat state.

    ``states[index]`` is the trajectory of the permuted (functionally identical) model.
    """
    g = task.graph
    if task.flat_ids is None:  # each parameter as its own flat indices, shaped like the parameter
        sd, off = {}, 0
        for name, shape in zip(g.param_names, g.param_shapes):
            n = math.prod(shape)
            sd[name] = torch.arange(off, off + n).view(shape)
            off += n
        task.flat_ids = sd
    out = task.ir.sample_symmetry(generator).apply(task.flat_ids)
    return torch.cat([out[name].reshape(-1) for name in g.param_names])


class WindowSampler:
    """Random windows as the paper samples them, reproducible from a :class:`torch.Generator`.

    Each draw picks a task uniformly, one of its runs uniformly, and a newest state uniformly among
    the positions that leave ``per_run`` consecutive windows (each shifted by one spacing) with at
    least one target; the ``per_run`` windows share one LPE sign flip (``lpe_flip``) and, with
    ``permute``, one random neuron permutation. Windows whose own states are not finite are dropped
    and counted in ``bad_windows``.
    """

    def __init__(self, tasks: Sequence[TrajectoryTask], generator: torch.Generator, *, per_run: int = 4,
                 lpe: int = 8, lpe_flip: bool = True, permute: bool = False, split: str = "train"):
        if per_run < 1:
            raise MetaTrainError("per_run must be >= 1")
        if permute and any(t.ir is None for t in tasks):
            raise MetaTrainError("permutation augmentation needs each task's neugraph.trace IR (load_task(ir=...))")
        self.tasks, self.gen, self.per_run, self.lpe = list(tasks), generator, per_run, lpe
        self.lpe_flip, self.permute, self.split = lpe_flip, permute, split
        self.bad_windows = 0
        self._runs = [t.train_runs if split == "train" else t.val_runs for t in self.tasks]
        if not any(len(r) for r in self._runs):
            raise MetaTrainError(f"no {split} runs with a complete window in any task")

    def _randint(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi] from the sampler's generator."""
        return lo + int(torch.randint(hi - lo + 1, (1,), generator=self.gen))

    def locate(self) -> tuple[int, int, list[int], torch.Tensor | None, torch.Tensor | None]:
        """Where the next group comes from: (task index, run, newest saves, LPE sign, flat permutation)."""
        choices = [i for i, r in enumerate(self._runs) if len(r)]
        ti = choices[self._randint(0, len(choices) - 1)]
        task = self.tasks[ti]
        runs = self._runs[ti]
        run = int(runs[self._randint(0, len(runs) - 1)])
        lo, hi = task.newest_range(run)
        n = min(self.per_run, (hi - lo) // task.stride + 1)
        start = self._randint(lo, hi - (n - 1) * task.stride)
        newest = [start + j * task.stride for j in range(n)]
        sign = None
        if self.lpe_flip and self.lpe:
            sign = torch.randint(2, (self.lpe,), generator=self.gen).float() * 2 - 1
        perm = flat_permutation(task, self.gen) if self.permute else None
        return ti, run, newest, sign, perm

    def draw(self) -> list[Window]:
        """One run's group of up to ``per_run`` windows."""
        ti, run, newest, sign, perm = self.locate()
        task = self.tasks[ti]
        out = []
        for t, (win, tgt, mask) in zip(newest, read_windows(task, run, newest)):
            if not bool(torch.isfinite(win).all()) or not bool(mask.any()):
                self.bad_windows += 1
                continue
            if perm is not None:
                win, tgt = win[perm], tgt[perm]
            out.append(Window(ti, run, t, win, tgt, mask, sign))
        return out

    def batch(self, size: int) -> list[Window]:
        """``size`` windows (groups of ``per_run`` from random runs)."""
        out: list[Window] = []
        attempts = 0
        while len(out) < size:
            got = self.draw()
            out += got[: size - len(out)]
            attempts += 1
            if attempts > 100 * size and not out:
                raise MetaTrainError("every sampled window has non-finite states; the store holds diverged runs: "
                                     "recollect it or drop those runs")
        return out


@dataclass(frozen=True)
class WindowSpec:
    """Where a window is: task index, run, newest save (read with :func:`read_windows` when needed)."""

    task: int
    run: int
    newest: int


def fixed_windows(tasks: Sequence[TrajectoryTask], count: int, seed: int) -> list[WindowSpec]:
    """``count`` fixed held-out window positions (validation runs, no augmentation).

    Only positions are kept, so validation costs no memory between evaluations.
    """
    if not any(len(t.val_runs) for t in tasks) or count <= 0:
        return []
    sampler = WindowSampler(tasks, torch.Generator().manual_seed(seed), per_run=1, lpe_flip=False,
                            split="val")
    return [WindowSpec(ti, run, newest[0]) for ti, run, newest, _, _ in (sampler.locate() for _ in range(count))]


def read_window(tasks: Sequence[TrajectoryTask], spec: WindowSpec) -> Window | None:
    """The window at ``spec``, or None when its states are not finite or it has no finite target."""
    (win, tgt, mask), = read_windows(tasks[spec.task], spec.run, [spec.newest])
    if not bool(torch.isfinite(win).all()) or not bool(mask.any()):
        return None
    return Window(spec.task, spec.run, spec.newest, win, tgt, mask)


# ---- the loss ----------------------------------------------------------------------------------------
def _signed_graph(graph, sign: torch.Tensor | None):
    """The graph with LPE columns multiplied by ``sign`` (a shallow copy; the original is untouched)."""
    if sign is None:
        return graph
    g = copy.copy(graph)
    nf = graph.node_features.clone()
    n = min(len(sign), nf.shape[1])
    nf[:, :n] = nf[:, :n] * sign[:n].to(nf.dtype)
    g.node_features = nf
    return g


@dataclass
class ParamMap:
    """Where every parameter element sits in the head's output, from ``graph.to_params`` itself.

    ``flat[p] = edge * max_feat + slot`` of element ``p``; ``groups`` lists, per feature slot, the
    edges of the elements carried in that slot; concatenating the groups' elements and indexing
    with ``inverse`` gives parameter order back.
    """

    flat: torch.Tensor
    groups: list[tuple[int, torch.Tensor]]
    inverse: torch.Tensor

    @classmethod
    def of(cls, graph) -> "ParamMap":
        ep, mf = graph.num_param_edges, graph.max_feat
        flat = graph.to_params(torch.arange(ep * mf).view(ep, mf))  # the exact inverse map, as indices
        edge, slot = flat // mf, flat % mf
        rows = [torch.nonzero(slot == sl).flatten() for sl in torch.unique(slot)]
        groups = [(int(slot[r[0]]), edge[r]) for r in rows]
        order = torch.cat(rows)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        return cls(flat, groups, inverse)


def predict_scaled_all(model: NiNoGNN, graph, scaled: torch.Tensor, pmap: ParamMap | None = None) -> torch.Tensor:
    """(P, K) predicted scaled states at every horizon: ``scaled[:, -1] + delta_k``, differentiable.

    The same network as :meth:`NiNoGNN.predict` (``edge_states`` and the head) with all horizons
    at once. Gradients flow through one gather instead of ``graph.to_params``'s per-block slices
    (whose backward fills a full-size zero tensor per block). For the MLP head the last layer is
    evaluated only for the (edge, slot) pairs that carry a parameter: the same rows
    ``slot * K + (k - 1)`` that ``MLPHead.forward`` uses, for all ``k``.
    """
    pmap = pmap or ParamMap.of(graph)
    dev = scaled.device
    e = model.edge_states(graph, scaled)[: graph.num_param_edges]
    head = model.head
    if isinstance(head, MLPHead):
        h = head.mlp[1](head.mlp[0](e))
        last, K = head.mlp[2], head.horizon
        parts = [F.linear(h[edges.to(dev)], last.weight[sl * K:(sl + 1) * K], last.bias[sl * K:(sl + 1) * K])
                 for sl, edges in pmap.groups]
        delta = torch.cat(parts)[pmap.inverse.to(dev)]
    else:
        out = head.all(e)[:, : graph.max_feat]  # (E_param, slots, K)
        delta = out.reshape(-1, out.shape[-1])[pmap.flat.to(dev)]
    return scaled[:, -1:] + delta.float()


def window_loss(model: NiNoGNN, task: TrajectoryTask, window: Window) -> torch.Tensor:
    """Masked L1 between predicted and target states in the window's scaled space (a scalar).

    Rows the nowcaster cannot move are left out: frozen parameters, and, for per-tensor ``std``
    scaling, tensors constant over the window (their divisor is ``eps``: the nowcast returns them
    unchanged, and their scaled targets would be ``change / 1e-6``).
    """
    return _masked_l1(model, task, window, persistence=False)


def persistence_loss(model: NiNoGNN, task: TrajectoryTask, window: Window) -> torch.Tensor:
    """:func:`window_loss` of the no-change prediction (every horizon = the newest state).

    The floor a useful nowcaster must beat; a model whose held-out loss sits at it predicts
    (almost) no change, the signature of a collapsed meta-training run.
    """
    return _masked_l1(model, task, window, persistence=True)


def relative_window_loss(model: NiNoGNN, task: TrajectoryTask, window: Window) -> torch.Tensor:
    """:func:`window_loss` divided by the window's no-change loss (1.0 = no better than no change).

    On mixed data the plain loss is dominated by the tasks whose windows move most in scaled space
    (byte-level language models: no-change loss ~1.5x FM/16's), and predicting no change is a strong
    attractor; the ratio gives every window the same weight in "improvement over no change".
    """
    return _masked_l1(model, task, window, persistence=False, relative=True)


def _masked_l1(model: NiNoGNN, task: TrajectoryTask, window: Window, persistence: bool,
               relative: bool = False) -> torch.Tensor:
    dev = next(model.parameters()).device
    states = window.states.to(dev)
    scaled, sc = scale(states, task.graph, model.scaling)  # exactly as inference scales
    shift, div = sc.rows()
    targets = (window.targets.to(dev) - shift) / div
    if persistence:
        pred = scaled[:, -1:].expand_as(targets)
    else:
        pred = predict_scaled_all(model, _signed_graph(task.graph, window.lpe_sign), scaled, task.param_map)
    rows = task.trainable.to(dev) & (div[:, 0] > sc.eps)
    mask = window.mask.to(dev)
    err = (pred - targets).abs()[rows][:, mask]
    if err.numel() == 0:
        return pred.sum() * 0.0
    if relative:  # over the no-change loss of the same rows (no gradient through the divisor)
        floor = (scaled[:, -1:].expand_as(targets) - targets).abs()[rows][:, mask].mean().detach().float()
        return err.mean() / floor.clamp_min(1e-8)
    return err.mean()


@torch.no_grad()
def heldout_losses(model: NiNoGNN, tasks: Sequence[TrajectoryTask], windows: Sequence[Window | WindowSpec],
                   persistence: bool = False) -> dict[str, float]:
    """Mean window loss of ``model`` per task name and over all windows (key ``"all"``).

    ``persistence``: the no-change prediction's loss instead (:func:`persistence_loss`). Windows
    whose states are not finite are left out. Puts ``model`` in eval mode.
    """
    loss_fn = persistence_loss if persistence else window_loss
    model.eval()
    losses: dict[str, list[float]] = {}
    for w in windows:
        if isinstance(w, WindowSpec):
            w = read_window(tasks, w)
            if w is None:
                continue
        task = tasks[w.task]
        losses.setdefault(task.name, []).append(float(loss_fn(model, task, w)))
    out = {name: float(np.mean(v)) for name, v in losses.items()}
    every = [x for v in losses.values() for x in v]
    out["all"] = float(np.mean(every)) if every else float("nan")
    return out


def load_for_evaluation(path: str | Path) -> NiNoGNN:
    """A meta-training checkpoint (``.pt`` from ``checkpoints/``) or anything ``nowcast.load`` reads
    (a ``nowcast.save`` directory, a ``.safetensors`` file, a published NiNo ``.pt``)."""
    path = Path(path)
    if path.suffix == ".pt" and path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and {"model", "config", "step"} <= set(state):
            model = NiNoGNN(**state["config"].get("model", {}))
            model.load_state_dict(state["model"])
            return model
    from . import load

    model = load(path)
    if not isinstance(model, NiNoGNN):
        raise MetaTrainError(f"{path} holds a {type(model).__name__}; --evaluate takes NiNo GNN nowcasters")
    return model


# ---- configuration -----------------------------------------------------------------------------------
@dataclass
class MetaTrainConfig:
    """Everything that defines a meta-training run (defaults: docs/metatrain.md says why)."""

    steps: int = 20_000
    batch: int = 16
    per_run: int = 4
    lr: float = 3e-3
    min_lr: float = 1e-6
    warmup: int = 0
    weight_decay: float = 1e-2
    clip: float = 5.0
    period: int | list[int] = 1000  # a list: one period per --tasks entry (tasks with different schedules)
    lpe_flip: bool = True
    permute: bool = False
    amp: bool = True
    seed: int = 0
    val_fraction: float = 0.1
    max_runs: int | list[int] | None = None  # use each store's first max_runs runs only (a list: per --data root)
    val_windows: int = 64
    val_every: int = 500
    ckpt_every: int = 200
    keep: int = 2
    model: dict = field(default_factory=dict)  # NiNoGNN arguments (defaults: the published architecture)
    relative: bool = False  # train on each window's loss divided by its no-change loss (relative_window_loss)
    init: str | None = None  # start from this nowcaster's weights (load_for_evaluation) instead of a random init
    vocab_sample: int | None = None  # language models with a larger vocabulary: that many token rows (vocab_columns)

    # keys that change the weights the run produces (a resumed run must agree on them)
    TRAINING_KEYS = ("steps", "batch", "per_run", "lr", "min_lr", "warmup", "weight_decay", "clip", "period",
                     "lpe_flip", "permute", "amp", "seed", "val_fraction", "model", "relative", "init",
                     "vocab_sample")

    def __post_init__(self):
        for key in ("steps", "batch", "per_run", "val_every", "ckpt_every"):
            if int(getattr(self, key)) < 1:
                raise MetaTrainError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 0 < self.min_lr <= self.lr:
            raise MetaTrainError(f"need 0 < min_lr ({self.min_lr}) <= lr ({self.lr})")
        if not 0 <= self.warmup < self.steps:
            raise MetaTrainError(f"warmup ({self.warmup}) must be in 0 .. steps - 1 ({self.steps - 1})")
        if not self.clip > 0:
            raise MetaTrainError(f"clip must be > 0, got {self.clip}")
        if not 0 <= self.val_fraction < 1:
            raise MetaTrainError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.vocab_sample is not None and int(self.vocab_sample) < 1:
            raise MetaTrainError(f"vocab_sample must be >= 1 (or None: whole vocabularies), got {self.vocab_sample}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def training_dict(self) -> dict:
        d = self.to_dict()
        return {k: d[k] for k in self.TRAINING_KEYS}


class WarmupCosine:
    """LR factor for step ``s`` (0-based): linear warm-up to 1, then cosine to ``min_ratio``."""

    def __init__(self, steps: int, warmup: int = 0, min_ratio: float = 0.0):
        self.steps, self.warmup, self.min_ratio = int(steps), int(warmup), float(min_ratio)

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / self.warmup
        progress = min(1.0, (s - self.warmup) / max(1, self.steps - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---- the trainer -------------------------------------------------------------------------------------
@dataclass
class StepResult:
    loss: float
    grad_norm: float
    ok: bool


class MetaTrainer:
    """Meta-trains a :class:`NiNoGNN` on ``tasks``; writes everything under ``out``.

    ``run()`` resumes from the newest checkpoint in ``out/checkpoints`` when there is one (the
    training configuration must then be the same), trains to ``config.steps``, and saves the
    nowcaster with :func:`nowcast.save` to ``out/nowcaster``. The model is initialised after
    ``torch.manual_seed(config.seed)`` (the global RNG is reseeded); the window stream has its own
    generator.
    """

    def __init__(self, tasks: Sequence[TrajectoryTask], config: MetaTrainConfig, out: str | Path,
                 device: str | torch.device | None = None, progress: bool = True,
                 task_info: dict | None = None):
        if not tasks:
            raise MetaTrainError("no tasks to meta-train on")
        self.tasks, self.cfg, self.out = list(tasks), config, Path(out)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.progress, self.task_info = progress, task_info or {}
        torch.manual_seed(config.seed)
        self.model = NiNoGNN(**config.model)
        if config.init:
            self._warm_start(config.init)
        self.model = self.model.to(self.device).train()
        for t in self.tasks:
            if t.ctx != self.model.ctx or t.horizon != self.model.max_horizon:
                raise MetaTrainError(f"task {t.name}: loaded with ctx={t.ctx}, horizon={t.horizon} but the model "
                                     f"has ctx={self.model.ctx}, horizon={self.model.max_horizon}; load_task with "
                                     "the model's values")
            if t.graph.max_feat > self.model.max_feat:
                raise MetaTrainError(f"task {t.name}: its graph has {t.graph.max_feat} feature slots but the model "
                                     f"takes {self.model.max_feat}; compile with profile='nino' or raise max_feat")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, WarmupCosine(config.steps, config.warmup, config.min_lr / config.lr))
        self.gen = torch.Generator().manual_seed(config.seed)
        self.sampler = WindowSampler(self.tasks, self.gen, per_run=config.per_run, lpe=self.model.lpe,
                                     lpe_flip=config.lpe_flip, permute=config.permute)
        self.val = fixed_windows(self.tasks, config.val_windows, seed=config.seed + 1_000_003)
        self.step, self.skipped = 0, 0
        self.amp = bool(config.amp and self.device.type == "cuda")
        self._loss = relative_window_loss if config.relative else window_loss

    def _warm_start(self, path: str) -> None:
        src = load_for_evaluation(path)
        if src.config != self.model.config:
            diff = {k: (v, self.model.config.get(k)) for k, v in src.config.items() if self.model.config.get(k) != v}
            raise MetaTrainError(f"--init {path}: its architecture differs from the model being trained (theirs, ours: "
                                 f"{diff}); pass the same --hidden/--layers/--head as the run that made it")
        self.model.load_state_dict(src.state_dict())

    # ---- one step ----------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp)

    def train_step(self, windows: Sequence[Window]) -> StepResult:
        """One optimizer step on ``windows`` (loss = mean of the window losses).

        A non-finite loss or gradient norm skips the step: the weights and the optimizer's moments
        are left exactly as they were and ``self.skipped`` grows by one. The LR schedule advances
        either way (the step is consumed).
        """
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        finite = True
        for w in windows:
            with self._autocast():
                loss = self._loss(self.model, self.tasks[w.task], w) / len(windows)
            if not torch.isfinite(loss):
                finite = False
                total = float("nan")
                break
            loss.backward()
            total += float(loss.detach())
        norm = float("nan")
        if finite:
            norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip))
            finite = math.isfinite(norm)
        if finite:
            self.opt.step()
        else:
            self.skipped += 1
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.step += 1
        return StepResult(total, norm, finite)

    @torch.no_grad()
    def evaluate(self, windows: Sequence[Window | WindowSpec] | None = None) -> float:
        """Mean window loss on ``windows`` (default: the fixed held-out windows); NaN if none.

        Held-out windows whose states are not finite are left out.
        """
        return self.evaluate_by_task(windows)["all"]

    @torch.no_grad()
    def evaluate_by_task(self, windows: Sequence[Window | WindowSpec] | None = None,
                         persistence: bool = False) -> dict[str, float]:
        """Mean held-out loss per task name and over all windows (key ``"all"``).

        ``persistence``: the no-change prediction's loss instead of the model's (:func:`persistence_loss`).
        """
        with self._autocast():
            out = heldout_losses(self.model, self.tasks, self.val if windows is None else windows, persistence)
        self.model.train()
        return out

    def _val_record(self) -> dict:
        by = self.evaluate_by_task()
        rec = {"step": self.step, "val_loss": by.pop("all")}
        if len(by) > 1:
            rec["val_by_task"] = by
        return rec

    # ---- checkpoints -------------------------------------------------------------------------------
    def _ckpt_dir(self) -> Path:
        return self.out / CKPT_DIR

    def checkpoints(self) -> list[Path]:
        return sorted(self._ckpt_dir().glob("step_*.pt"))

    def save_checkpoint(self) -> Path:
        d = self._ckpt_dir()
        d.mkdir(parents=True, exist_ok=True)
        state = {"step": self.step, "skipped": self.skipped, "bad_windows": self.sampler.bad_windows,
                 "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                 "scheduler": self.sched.state_dict(), "rng": {"sampler": self.gen.get_state(),
                                                               "torch": torch.get_rng_state()},
                 "config": _jsonable(self.cfg.training_dict())}
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        path = d / f"step_{self.step:08d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        for old in self.checkpoints()[: -self.cfg.keep] if self.cfg.keep > 0 else []:
            old.unlink()
        return path

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        # a key added after the checkpoint was written holds its default there
        saved = {**_jsonable(MetaTrainConfig().training_dict()), **(state.get("config") or {})}
        if saved != _jsonable(self.cfg.training_dict()):
            diff = {k: (saved.get(k), v) for k, v in _jsonable(self.cfg.training_dict()).items()
                    if saved.get(k) != v}
            raise MetaTrainError(f"{path} was written by a run with other settings {diff} (checkpoint, now); rerun "
                                 "with the same arguments to resume, or use another --out")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.gen.set_state(state["rng"]["sampler"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step, self.skipped = int(state["step"]), int(state["skipped"])
        self.sampler.bad_windows = int(state["bad_windows"])

    # ---- the loop ----------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.out / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _trim_log(self) -> None:
        """Drop log lines after the resumed step (they were written after the checkpoint)."""
        path = self.out / LOG_FILE
        if not path.exists():
            return
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= self.step]
        path.write_text("".join(line + "\n" for line in keep))

    def _write_config(self, resume: bool) -> None:
        path = self.out / CONFIG_FILE
        record = {"config": _jsonable(self.cfg.to_dict()), "tasks": self.task_info or [t.name for t in self.tasks],
                  "device": str(self.device), "torch": torch.__version__, "threads": torch.get_num_threads()}
        if not resume:
            path.write_text(json.dumps(record, indent=2, sort_keys=True))

    def run(self, until: int | None = None, resume: bool | None = None) -> dict:
        """Train to ``config.steps`` (or stop after step ``until``, for tests); return a summary.

        ``resume`` None: continue from the newest checkpoint if there is one; True: there must be
        one; False: there must be none.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        ckpts = self.checkpoints()
        if resume is True and not ckpts:
            raise MetaTrainError(f"--resume: no checkpoint in {self._ckpt_dir()}; run without --resume to start")
        if resume is False and ckpts:
            raise MetaTrainError(f"{self.out} already holds checkpoints of a run; resume it (same arguments) or "
                                 "choose another --out")
        if ckpts:
            self.load_checkpoint(ckpts[-1])
            self._trim_log()
        elif (self.out / LOG_FILE).exists():
            (self.out / LOG_FILE).unlink()
        self._write_config(resume=bool(ckpts))
        cfg = self.cfg
        stop = cfg.steps if until is None else min(until, cfg.steps)
        bar = _progress(total=cfg.steps, initial=self.step, enabled=self.progress)
        if self.step == 0 and self.val:
            rec = self._val_record()
            base = self.evaluate_by_task(persistence=True)
            rec["val_persistence"] = base.pop("all")
            if len(base) > 1:
                rec["persistence_by_task"] = base
            self._log(rec)
        val_loss = float("nan")
        while self.step < stop:
            t0 = time.perf_counter()
            lr = self.opt.param_groups[0]["lr"]
            windows = self.sampler.batch(cfg.batch)
            res = self.train_step(windows)
            self._log({"step": self.step, "loss": res.loss if res.ok else None, "lr": lr,
                       "grad_norm": res.grad_norm if res.ok else None, "skipped": not res.ok,
                       "sec": round(time.perf_counter() - t0, 4)})
            if self.val and (self.step % cfg.val_every == 0 or self.step == cfg.steps):
                rec = self._val_record()
                val_loss = rec["val_loss"]
                self._log(rec)
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
            bar.update(1)
            bar.set_postfix(loss=f"{res.loss:.4f}", val=f"{val_loss:.4f}", skipped=self.skipped)
        bar.close()
        summary = self.summary()
        if self.step >= cfg.steps:
            summary["nowcaster"] = str(save_nowcaster(self.model.eval(), self.out / NOWCASTER_DIR).parent)
            self.model.train()
            (self.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True))
        try:
            plot_log(self.out / LOG_FILE, self.out / PLOT_FILE)
        except ImportError:  # matplotlib is optional at run time
            pass
        return summary

    def summary(self) -> dict:
        records = read_log(self.out / LOG_FILE)
        train = [r["loss"] for r in records if r.get("loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
        tail = train[-min(len(train), 100):] if train else []
        base = next((r["val_persistence"] for r in records if "val_persistence" in r), None)
        by_task = next((r["val_by_task"] for r in reversed(records) if "val_by_task" in r), None)
        return {"val_persistence": base if base is not None else float("nan"),
                **({"val_by_task": by_task} if by_task else {}),"step": self.step, "steps": self.cfg.steps, "skipped_steps": self.skipped,
                "bad_windows": self.sampler.bad_windows,
                "train_loss": float(np.mean(tail)) if tail else float("nan"),
                "val_loss": val[-1][1] if val else float("nan"), "val_step": val[-1][0] if val else None,
                "weights": sum(p.numel() for p in self.model.parameters())}


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d))


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kw) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="meta-train", unit="step", dynamic_ncols=True)


def read_log(path: str | Path) -> list[dict]:
    """The JSON-lines log: training lines (``loss``, ``lr``, ...) and validation lines (``val_loss``)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_log(log: str | Path, png: str | Path) -> Path:
    """Training loss (raw and a 50-step moving mean) and validation loss against steps, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and r["val_loss"] is not None
           and math.isfinite(r["val_loss"])]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        s, v = np.array(train).T
        ax.plot(s, v, color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
        w = min(50, len(v))
        ax.plot(s[w - 1:], np.convolve(v, np.ones(w) / w, mode="valid"), color="tab:blue",
                label=f"train ({w}-step mean)")
    if val:
        s, v = np.array(val).T
        ax.plot(s, v, "o-", color="tab:orange", label="validation (held-out runs)")
    base = next((r["val_persistence"] for r in records if r.get("val_persistence") is not None), None)
    if base is not None and math.isfinite(base):
        ax.axhline(base, color="tab:gray", ls="--", lw=1, label="validation, no-change prediction")
    ax.set_xlabel("meta-training step")
    ax.set_ylabel("masked L1 (scaled space)")
    if train or val:
        ax.set_yscale("log")
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


# ---- command line ------------------------------------------------------------------------------------
def compile_task(name: str, lpe: int = 8):
    """(graph, ir) of a registered task's model (``nowcast.tasks``), compiled with the nino profile."""
    import neugraph

    from . import tasks as registry

    task = registry.get_task(name)
    model = registry.build_model(task, seed=0)
    ir = neugraph.trace(model, registry.example_inputs(task))
    graph = neugraph.compile(ir, profile="nino", lpe=lpe)
    names = [n for n, _ in model.named_parameters()]
    if graph.param_names != names:
        raise MetaTrainError(f"task {name}: graph.param_names differ from named_parameters(); the compiler and the "
                             "collector would disagree on the flat order")
    return graph, ir


def vocab_rows(vocab: int, n: int, seed: int) -> np.ndarray:
    """``n`` of the token ids ``0 .. vocab - 1``, drawn uniformly without replacement from ``seed``, sorted."""
    if not 1 <= n <= vocab:
        raise MetaTrainError(f"cannot sample {n} of {vocab} vocabulary rows; choose 1 <= n <= {vocab}")
    return np.sort(torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[:n].numpy())


def vocab_columns(full_shapes: Sequence[Sequence[int]], sampled_shapes: Sequence[Sequence[int]], vocab: int,
                  rows: np.ndarray) -> np.ndarray:
    """Entries of a flat state of a model that form the flat state of the same model at vocabulary ``len(rows)``.

    Both flat states hold the parameters one after another in the same order. Along an axis of size
    ``vocab`` in the full model and ``len(rows)`` in the sampled one the entries of token ``rows``
    are kept (in that order); every other axis must be the same size.
    """
    if len(full_shapes) != len(sampled_shapes):
        raise MetaTrainError(f"{len(full_shapes)} parameters in the full model but {len(sampled_shapes)} in the "
                             "sampled one; they must be the same model at two vocabulary sizes")
    picked = torch.as_tensor(np.asarray(rows), dtype=torch.long)
    out, off = [], 0
    for full, small in zip(full_shapes, sampled_shapes):
        full, small = tuple(int(d) for d in full), tuple(int(d) for d in small)
        if len(full) != len(small):
            raise MetaTrainError(f"a parameter of shape {full} has shape {small} in the sampled model")
        ids = torch.arange(off, off + math.prod(full)).view(full)
        for axis, (a, b) in enumerate(zip(full, small)):
            if a == b:
                continue
            if a != vocab or b != len(picked):
                raise MetaTrainError(f"a parameter of shape {full} has shape {small} in the sampled model: only "
                                     f"vocabulary axes ({vocab} -> {len(picked)}) may differ")
            ids = ids.index_select(axis, picked)
        out.append(ids.reshape(-1))
        off += math.prod(full)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def compile_sampled_task(name: str, n: int, seed: int, lpe: int = 8):
    """(graph, ir, columns) of a registered language model's task at vocabulary ``n``, or None.

    None when the task has no token vocabulary larger than ``n`` (it is meta-trained whole). Else
    the graph is of the same architecture with ``n`` token rows, and ``columns`` picks, from a
    stored state of the full model, the entries of :func:`vocab_rows` ``(vocab, n, seed)``. A GPT-2
    BPE model is 98% embedding (50,257 rows); its materialised graph costs 32 s a GNN forward pass
    on a CPU; at a sampled vocabulary of 1,024 it has 49,849 edges (byte-level austen-3-24: 32,249).
    The GNN aggregates messages by their mean, so the hidden neurons see a fair sample of rows.
    """
    from . import tasks as registry

    task = registry.get_task(name)
    vocab = task.arch.get("vocab") if task.kind != "vision" else None
    if vocab is None or vocab <= n:
        return None
    return compile_at_rows(name, vocab_rows(vocab, n, seed), lpe=lpe)


def compile_at_rows(name: str, rows: np.ndarray, lpe: int = 8):
    """(graph, ir, columns) of a registered language model's task at the token ids ``rows``: the same
    architecture with ``len(rows)`` token rows, and the entries of a full flat state that form its state."""
    import neugraph

    from . import tasks as registry

    task = registry.get_task(name)
    vocab = task.arch.get("vocab") if task.kind != "vision" else None
    if vocab is None:
        raise MetaTrainError(f"task {name} has no token vocabulary")
    small = dataclasses.replace(task, arch={**task.arch, "vocab": len(rows)})
    model = registry.build_model(small, seed=0)
    ir = neugraph.trace(model, registry.example_inputs(small))
    graph = neugraph.compile(ir, profile="nino", lpe=lpe)
    full = [tuple(p.shape) for _, p in registry.build_model(task, seed=0).named_parameters()]
    sampled = [tuple(p.shape) for _, p in model.named_parameters()]
    if graph.param_names != [nm for nm, _ in model.named_parameters()]:
        raise MetaTrainError(f"task {name}: graph.param_names differ from named_parameters(); the compiler and the "
                             "collector would disagree on the flat order")
    return graph, ir, vocab_columns(full, sampled, vocab, rows)


def _periods(text: str) -> int | list[int]:
    """``--period`` value: ``P`` (every task) or ``P1,P2,...`` (one per ``--tasks`` entry)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--period takes P or P1,P2,... (whole numbers), got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _max_runs(text: str) -> int | list[int]:
    """``--max-runs`` value: ``N`` (every store) or ``N1,N2,...`` (one per ``--data`` root)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--max-runs takes N or N1,N2,... (whole numbers), got {text!r}") from None
    return values[0] if len(values) == 1 else values


def build_parser() -> argparse.ArgumentParser:
    d = MetaTrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m nowcast.metatrain",
        description="Meta-train the NiNo GNN on collected trajectories (docs/metatrain.md). Reruns with the same "
                    "--out resume from the newest checkpoint.")
    p.add_argument("--data", required=True,
                   help="trajectory root(s), comma-separated: each holds one <task>/ store (states.f16, meta.json) "
                        "per task; every root must hold every task in --tasks (more runs of the same task: "
                        "collect them into a second root)")
    p.add_argument("--tasks", required=True, help="comma-separated task names (nowcast.tasks), e.g. fm16,austen-3-24")
    p.add_argument("--out", default="runs/metatrain", help="output directory (checkpoints, log, plot, nowcaster)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"windows per step (default {d.batch})")
    p.add_argument("--per-run", type=int, default=d.per_run,
                   help=f"consecutive windows taken from each sampled run (default {d.per_run})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak AdamW learning rate (default {d.lr})")
    p.add_argument("--min-lr", type=float, default=d.min_lr, help=f"final cosine learning rate (default {d.min_lr})")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"linear warm-up steps (default {d.warmup})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW weight decay ({d.weight_decay})")
    p.add_argument("--clip", type=float, default=d.clip, help=f"gradient-norm clip (default {d.clip})")
    p.add_argument("--period", type=_periods, default=d.period,
                   help=f"steps covered by a window: states every period/ctx steps (default {d.period}); "
                        "P1,P2,... gives one per --tasks entry (e.g. each task's own Task.period)")
    p.add_argument("--no-lpe-flip", action="store_true", help="do not flip LPE signs at random (on by default)")
    p.add_argument("--permute", action="store_true",
                   help="augment each window with a random neuron permutation of its model (off by default)")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA (never used on CPU)")
    p.add_argument("--max-runs", type=_max_runs, default=None,
                   help="use only the first N runs of each store, or N1,N2,... one per --data root (default: all)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help=f"last fraction of each task's runs held out (default {d.val_fraction})")
    p.add_argument("--val-windows", type=int, default=d.val_windows, help=f"held-out windows (default {d.val_windows})")
    p.add_argument("--val-every", type=int, default=d.val_every, help=f"validate every N steps ({d.val_every})")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help=f"checkpoint every N steps ({d.ckpt_every})")
    p.add_argument("--keep", type=int, default=d.keep, help=f"checkpoints kept (default {d.keep})")
    p.add_argument("--relative", action="store_true",
                   help="train on each window's loss divided by its no-change loss, so tasks whose windows move "
                        "more do not dominate mixed data (validation still reports the plain loss)")
    p.add_argument("--init", default=None, metavar="PATH",
                   help="start from this nowcaster's weights (.safetensors, a nowcast.save directory or a "
                        "meta-training .pt) instead of a random init: fine-tune a checkpoint on more data")
    p.add_argument("--vocab-sample", type=int, default=None, metavar="N",
                   help="language models with more than N tokens (GPT-2 BPE: 50,257) are meta-trained on N token "
                        "rows drawn once from --seed and the graph of the same model at vocabulary N (default: "
                        "whole models)")
    p.add_argument("--hidden", type=int, default=128, help="GNN hidden size (default 128, the published model)")
    p.add_argument("--layers", type=int, default=3, help="message-passing layers (default 3)")
    p.add_argument("--head", default="mlp", choices=("mlp", "gru", "lstm"), help="DMS head (default mlp)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the model init and the window stream")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is fastest on a busy shared machine)")
    p.add_argument("--resume", action="store_true", help="require a checkpoint in --out to continue from")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the run's summary as one JSON object")
    p.add_argument("--evaluate", default=None, metavar="PATH[,PATH...]",
                   help="train nothing: print the held-out loss per task of these nowcasters (.safetensors or a "
                        "nowcast.save directory) or meta-training checkpoints (.pt), and of the no-change "
                        "prediction, on the windows a run with the same --data/--tasks/--period/--max-runs/"
                        "--val-windows/--seed would validate on")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_cfg: dict = {}
    if args.hidden != 128:
        model_cfg["hidden"] = args.hidden
    if args.layers != 3:
        model_cfg["layers"] = args.layers
    if args.head != "mlp":
        model_cfg["head"] = args.head
    cfg = MetaTrainConfig(steps=args.steps, batch=args.batch, per_run=args.per_run, lr=args.lr, min_lr=args.min_lr,
                          warmup=args.warmup, weight_decay=args.weight_decay, clip=args.clip, period=args.period,
                          lpe_flip=not args.no_lpe_flip, permute=args.permute, amp=not args.no_amp, seed=args.seed,
                          val_fraction=args.val_fraction, max_runs=args.max_runs, val_windows=args.val_windows,
                          val_every=args.val_every,
                          ckpt_every=args.ckpt_every, keep=args.keep, model=model_cfg, relative=args.relative,
                          init=args.init, vocab_sample=args.vocab_sample)
    probe = NiNoGNN(**model_cfg)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    tasks, info = [], []
    roots = [r.strip() for r in args.data.split(",") if r.strip()]
    limits = cfg.max_runs if isinstance(cfg.max_runs, list) else [cfg.max_runs] * len(roots)
    if len(limits) != len(roots):
        raise MetaTrainError(f"--max-runs gives {len(limits)} values for {len(roots)} --data roots; give one value, "
                             "or one per root in the same order")
    periods = cfg.period if isinstance(cfg.period, list) else [cfg.period] * len(names)
    if len(periods) != len(names):
        raise MetaTrainError(f"--period gives {len(periods)} values for {len(names)} --tasks; give one value, or one "
                             "per task in the same order")
    for name, period in zip(names, periods):
        sampled = None if cfg.vocab_sample is None else compile_sampled_task(name, cfg.vocab_sample, cfg.seed,
                                                                             lpe=probe.lpe)
        graph, ir, columns = sampled if sampled is not None else (*compile_task(name, lpe=probe.lpe), None)
        for root, limit in zip(roots, limits):  # one TrajectoryTask per store; each holds out its own last runs
            td = load_task(name, Path(root) / name, graph, period=period, ctx=probe.ctx,
                           horizon=probe.max_horizon, val_fraction=cfg.val_fraction, ir=ir, max_runs=limit,
                           columns=columns)
            tasks.append(td)
            info.append({"task": name, "store": str(Path(root) / name), "runs": int(td.states.shape[0]),
                         "train_runs": len(td.train_runs), "val_runs": len(td.val_runs), "save_every": td.save_every,
                         "stride_saves": td.stride, "num_params": td.num_params, "edges": td.graph.num_edges,
                         **({"vocab_sample": cfg.vocab_sample} if columns is not None else {})})
    if args.evaluate:
        return _evaluate(tasks, cfg, [p for p in args.evaluate.split(",") if p], args.json)
    trainer = MetaTrainer(tasks, cfg, args.out, device=args.device, progress=not args.no_progress, task_info=info)
    summary = trainer.run(resume=True if args.resume else None)
    if args.json:
        print(json.dumps(_jsonable(summary)))
        return 0
    print(f"step {summary['step']}/{summary['steps']}: train loss {summary['train_loss']:.5f} (mean of the last "
          f"100 steps), val loss {summary['val_loss']:.5f} (step {summary['val_step']}; no-change prediction "
          f"{summary['val_persistence']:.5f}), "
          f"{summary['skipped_steps']} skipped steps, {summary['bad_windows']} dropped windows")
    if "nowcaster" in summary:
        print(f"nowcaster saved to {summary['nowcaster']} (load with nowcast.load); log {Path(args.out) / LOG_FILE}, "
              f"plot {Path(args.out) / PLOT_FILE}")
    return 0


def _evaluate(tasks: Sequence[TrajectoryTask], cfg: MetaTrainConfig, paths: Sequence[str], as_json: bool) -> int:
    """``--evaluate``: held-out loss per task against the no-change floor (what a run would validate on)."""
    windows = fixed_windows(tasks, cfg.val_windows, seed=cfg.seed + 1_000_003)
    if not windows:
        raise MetaTrainError("no held-out windows: the stores need at least one held-out run (see --val-fraction)")
    rows = {"no-change": heldout_losses(NiNoGNN(**cfg.model), tasks, windows, persistence=True)}
    for path in paths:
        rows[path] = heldout_losses(load_for_evaluation(path), tasks, windows)
    if as_json:
        print(json.dumps(rows))
        return 0
    names = [k for k in rows["no-change"] if k != "all"] + ["all"]
    print(f"held-out masked L1 ({len(windows)} windows; lower is better; 'vs no-change' is the change against it)")
    for label, by in rows.items():
        cells = []
        for n in names:
            cell = f"{n} {by.get(n, float('nan')):.4f}"
            if label != "no-change":
                cell += f" ({100 * (by[n] / rows['no-change'][n] - 1):+.1f}%)"
            cells.append(cell)
        print(f"{label}: " + ", ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())

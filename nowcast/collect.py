"""Trajectory collection: the meta-training data of the NiNo nowcaster (``docs/collect.md``).

:func:`collect` trains ``runs`` independent models of one task with AdamW and saves every run's
flat parameter vector every ``save_every`` steps into a memory-mapped float16 store::

    out_dir/<task>/states.f16     (runs, n_saves, num_params) float16, raw (numpy.memmap)
    out_dir/<task>/losses.npy     (runs, n_saves) float32: mean training loss per save interval
    out_dir/<task>/meta.json      settings, param names/shapes, per-run seed/lr, ``done`` counts
    out_dir/<task>/resume_g{i}.pt float32 params + AdamW state of group i (only while unfinished)

Runs are trained ``group`` at a time in one process. Two paths (``mode``):

- ``"vmap"`` stacks the group's parameters into one ``(group, num_params)`` tensor, computes every
  run's gradient at once with ``torch.func.functional_call`` under ``torch.vmap`` and applies a
  batched AdamW written on the stacked tensors (the arithmetic of ``torch.optim.AdamW``, one lr
  per run). A model that cannot be vmapped falls back to the sequential path, with a
  :class:`VmapFallbackWarning` and a note in the metadata.
- ``"sequential"``: the reference, ordinary modules and ``torch.optim.AdamW``, one run after the
  other at every step. Measured faster on CPU, so it is the default (:data:`DEFAULT_MODE`).

Flat order: ``named_parameters()`` with tied parameters once -- the order of ``graph.param_names``
of ``neugraph.compile(model, ...)``, so a saved row is directly a nowcaster's ``states`` column.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

__all__ = ["collect", "load_trajectories", "Trajectories", "TaskOps", "task_ops", "benchmark",
           "BatchedAdamW", "CollectError", "CollectionInterrupted", "VmapFallbackWarning", "main",
           "DEFAULT_MODE", "FORMAT"]

FORMAT = "nowcast-trajectories/1"
#: The path ``mode="auto"`` takes. Measured on this project's CPU (docs/collect.md): training the
#: runs one after the other with ordinary modules is faster than the vmap path, by about 1.7x on
#: FM/16 at batch 128 and 1.3-1.9x on the small language models (vmap turns each convolution into a
#: grouped convolution whose backward is slower than the separate ones, and has no batching rule
#: for the CPU attention backward). vmap pays off where one run is too small to fill the machine.
DEFAULT_MODE = "sequential"
MODES = ("auto", "vmap", "sequential")
BETAS = (0.9, 0.999)
EPS = 1e-8


class CollectError(RuntimeError):
    """The store cannot be used as asked (different settings, corrupt metadata, ...)."""


class CollectionInterrupted(RuntimeError):
    """Raised by ``collect(..., stop_after=n)``: a simulated interruption (for tests)."""


class VmapFallbackWarning(RuntimeWarning):
    """The model could not be trained under ``torch.vmap``; the sequential path is used instead."""


# ---- what collect needs from a task ---------------------------------------------------------------------
@dataclass
class TaskOps:
    """The task functions :func:`collect` calls, bound to one task.

    :func:`task_ops` binds ``nowcast.tasks``; tests and custom tasks can pass their own.
    ``batches(data, seed, start_step)`` must be deterministic in ``(seed, step)``, since resuming
    restarts it at ``start_step``.
    """

    build_model: Callable[[int], nn.Module]
    load_data: Callable[[], Any]
    batches: Callable[[Any, int, int], Iterator[tuple[Any, Any]]]
    loss_fn: Callable[[nn.Module, Any, Any], torch.Tensor]


def task_ops(task: Any, data_root: Union[str, Path, None] = None) -> TaskOps:
    """:class:`TaskOps` from the registry in :mod:`nowcast.tasks`."""
    from . import tasks as T

    return TaskOps(build_model=lambda seed: T.build_model(task, seed),
                   load_data=lambda: T.load_task_data(task, root=data_root),
                   batches=lambda data, seed, start: T.batches(task, data, seed, start_step=start),
                   loss_fn=lambda model, x, y: T.loss_fn(task, model, x, y))


def _resolve_task(task: Any) -> Any:
    if isinstance(task, str):
        from . import tasks as T

        return T.get_task(task)
    for attr in ("name", "lr", "weight_decay", "batch_size", "steps"):
        if not hasattr(task, attr):
            raise TypeError(f"collect needs a task name or a Task-like object; {type(task).__name__} has no "
                            f"{attr!r}")
    return task


def _named_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``named_parameters()`` (tied parameters once), checked to be trainable float32."""
    named = list(model.named_parameters())
    if not named:
        raise ValueError(f"{type(model).__name__} has no parameters to train")
    for n, p in named:
        if not p.requires_grad:
            raise ValueError(f"parameter {n!r} has requires_grad=False; collect trains every parameter "
                             "(unfreeze it, or build the model without it)")
        if p.dtype != torch.float32:
            raise ValueError(f"parameter {n!r} is {p.dtype}; collect trains float32 models (call model.float())")
    return named


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])


# ---- batched AdamW ----------------------------------------------------------------------------------------
class BatchedAdamW:
    """AdamW on a ``(runs, num_params)`` tensor, one learning rate per row.

    Op for op the single-tensor ``torch.optim.AdamW`` step (decoupled decay ``p *= 1 - lr*wd``,
    ``m.lerp_(g, 1-b1)``, ``v = b2*v + (1-b2)*g*g``, ``p += (-lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)``),
    with the per-run scalars rounded to float32 exactly as PyTorch rounds its Python scalars, so given
    the same gradients each row equals what ``torch.optim.AdamW`` produces for that run, bitwise.
    """

    def __init__(self, params: torch.Tensor, lrs: Sequence[float], weight_decay: float,
                 betas: tuple[float, float] = BETAS, eps: float = EPS):
        if params.dim() != 2 or len(lrs) != params.shape[0]:
            raise ValueError(f"BatchedAdamW needs (runs, num_params) params and one lr per run; got "
                             f"{tuple(params.shape)} and {len(lrs)} lrs")
        self.params = params
        self.lrs = [float(v) for v in lrs]
        self.weight_decay = float(weight_decay)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.step_count = 0
        self.exp_avg = torch.zeros_like(params)
        self.exp_avg_sq = torch.zeros_like(params)
        col = dict(dtype=params.dtype, device=params.device)
        self._decay = torch.tensor([1 - lr * self.weight_decay for lr in self.lrs], **col).unsqueeze(1)

    @torch.no_grad()
    def step(self, grads: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.step_count += 1
        step = float(self.step_count)
        p, m, v = self.params, self.exp_avg, self.exp_avg_sq
        if self.weight_decay != 0:
            p.mul_(self._decay)
        m.lerp_(grads, 1 - b1)
        v.mul_(b2).addcmul_(grads, grads, value=1 - b2)
        bias_correction1 = 1 - b1 ** step
        bias_correction2_sqrt = (1 - b2 ** step) ** 0.5
        step_size = torch.tensor([-lr / bias_correction1 for lr in self.lrs], dtype=p.dtype,
                                 device=p.device).unsqueeze(1)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(self.eps)
        p.add_(step_size * m / denom)  # = addcdiv_(m, denom, value=-step_size): (value * m) / denom

    def state_dict(self) -> dict:
        return {"step": self.step_count, "exp_avg": self.exp_avg.clone(), "exp_avg_sq": self.exp_avg_sq.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])


# ---- the two trainers ---------------------------------------------------------------------------------------
def _stack_tree(items: list[Any]) -> Any:
    from torch.utils._pytree import tree_flatten, tree_unflatten

    leaves = [tree_flatten(it) for it in items]
    spec = leaves[0][1]
    cols = zip(*[lv for lv, _ in leaves])
    return tree_unflatten([torch.stack(list(c)) for c in cols], spec)


class _LossModule(nn.Module):
    """Wraps the model so that ``functional_call`` swaps its parameters while ``loss_fn`` runs."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, x: Any, y: Any) -> torch.Tensor:
        return self._loss_fn(self.model, x, y)


class _VmapTrainer:
    mode = "vmap"

    def __init__(self, models: list[nn.Module], lrs: Sequence[float], weight_decay: float, loss_fn: Callable):
        from torch.func import functional_call, grad_and_value, vmap

        base = models[0]
        named = _named_params(base)
        self.names = ["model." + n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.module = _LossModule(base, loss_fn)
        self.params = torch.stack([_flat(m) for m in models]).contiguous()
        per_model = [dict(m.named_buffers()) for m in models]
        self.buffers = {"model." + n: torch.stack([bm[n].detach() for bm in per_model]).contiguous()
                        for n, _ in base.named_buffers()}
        self.opt = BatchedAdamW(self.params, lrs, weight_decay)

        def loss_of(row: torch.Tensor, bufs: dict, x: Any, y: Any) -> torch.Tensor:
            ps = {n: t.view(s) for n, t, s in zip(self.names, row.split(self.sizes), self.shapes)}
            ps.update(bufs)
            return functional_call(self.module, ps, (x, y))

        self._fn = vmap(grad_and_value(loss_of), in_dims=(0, 0, 0, 0), randomness="different")

    def step(self, inputs: list[Any], targets: list[Any]) -> torch.Tensor:
        grads, losses = self._fn(self.params, self.buffers, _stack_tree(inputs), _stack_tree(targets))
        self.opt.step(grads)
        return losses.detach()

    def flat(self) -> torch.Tensor:
        return self.params

    def load_flat(self, flat: torch.Tensor) -> None:
        self.params.copy_(flat)

    def state_dict(self) -> dict:
        return {"params": self.params.clone(), "buffers": {k: v.clone() for k, v in self.buffers.items()},
                "adamw": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.params.copy_(state["params"])
        for k, v in state["buffers"].items():
            self.buffers[k].copy_(v)
        self.opt.load_state_dict(state["adamw"])


class _SequentialTrainer:
    """The reference: ordinary modules and ``torch.optim.AdamW``, one run after the other."""

    mode = "sequential"

    def __init__(self, models: list[nn.Module], lrs: Sequence[float], weight_decay: float, loss_fn: Callable):
        for m in models:
            _named_params(m)
        self.models = models
        self.loss_fn = loss_fn
        self.opts = [torch.optim.AdamW(m.parameters(), lr=float(lr), betas=BETAS, eps=EPS,
                                       weight_decay=float(weight_decay)) for m, lr in zip(models, lrs)]

    def step(self, inputs: list[Any], targets: list[Any]) -> torch.Tensor:
        losses = []
        for model, opt, x, y in zip(self.models, self.opts, inputs, targets):
            opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(model, x, y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses)

    def flat(self) -> torch.Tensor:
        return torch.stack([_flat(m) for m in self.models])

    @torch.no_grad()
    def load_flat(self, flat: torch.Tensor) -> None:
        for m, row in zip(self.models, flat):
            params = [p for _, p in m.named_parameters()]
            for p, part in zip(params, row.split([p.numel() for p in params])):
                p.copy_(part.view_as(p))

    def state_dict(self) -> dict:
        return {"models": [m.state_dict() for m in self.models], "adamw": [o.state_dict() for o in self.opts]}

    def load_state_dict(self, state: dict) -> None:
        for m, o, ms, os_ in zip(self.models, self.opts, state["models"], state["adamw"]):
            m.load_state_dict(ms)
            o.load_state_dict(os_)


def _make_trainer(mode: str, models: list[nn.Module], lrs: Sequence[float], weight_decay: float,
                  loss_fn: Callable) -> Union[_VmapTrainer, _SequentialTrainer]:
    cls = _VmapTrainer if mode == "vmap" else _SequentialTrainer
    return cls(models, lrs, weight_decay, loss_fn)


def _probe_vmap(ops: TaskOps, data: Any, seeds: Sequence[int], lrs: Sequence[float], weight_decay: float,
                group: int) -> Optional[str]:
    """None if a vmap step works for this model (tried on copies), else the reason it does not."""
    n = max(1, min(group, 2))
    models = [ops.build_model(int(s)) for s in list(seeds)[:n]]
    while len(models) < n:
        models.append(ops.build_model(int(seeds[0])))
    it = ops.batches(data, int(seeds[0]), 0)
    x, y = next(it)
    rng = torch.get_rng_state()
    try:
        trainer = _VmapTrainer(models, list(lrs)[:1] * n, weight_decay, ops.loss_fn)
        losses = trainer.step([x] * n, [y] * n)
        if losses.shape != (n,):
            return f"the vmapped loss has shape {tuple(losses.shape)}, expected ({n},) (loss_fn must return a scalar)"
    except Exception as e:  # noqa: BLE001 - any failure under vmap means: use the sequential path
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        torch.set_rng_state(rng)
    return None


# ---- the store -------------------------------------------------------------------------------------------
def _machine() -> dict:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count()
    return {"node": platform.node(), "platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "cores_available": cores,
            "torch_threads": torch.get_num_threads(), "device": "cpu"}


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_torch_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


SETTINGS_KEYS = ("task", "arch", "runs", "steps", "save_every", "n_saves", "group", "mode", "seeds", "lrs",
                 "lr_jitter", "weight_decay", "batch_size", "betas", "eps", "num_params", "param_names",
                 "param_shapes")


def _settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps({k: settings[k] for k in SETTINGS_KEYS}, sort_keys=True).encode()).hexdigest()


def _check_same_settings(old: dict, new: dict, task_dir: Path) -> None:
    diffs = [k for k in SETTINGS_KEYS if k != "mode" and old.get(k) != new.get(k)]
    if diffs:
        def show(v: Any) -> str:
            s = json.dumps(v)
            return s if len(s) <= 80 else s[:77] + "..."

        lines = "\n".join(f"  {k}: store {show(old.get(k))}, now {show(new.get(k))}" for k in diffs)
        raise CollectError(f"{task_dir} was collected with different settings:\n{lines}\n"
                           "Rerun with the store's settings to resume it, use another --out directory, or "
                           "start over with --restart (resume=False), which deletes this store.")


def _lrs_for(task: Any, seeds: Sequence[int], lrs: Optional[Sequence[float]], lr_jitter: float) -> list[float]:
    if lrs is not None:
        if len(lrs) != len(seeds):
            raise ValueError(f"lrs has {len(lrs)} entries for {len(seeds)} runs; give one learning rate per run")
        return [float(v) for v in lrs]
    if lr_jitter < 0:
        raise ValueError(f"lr_jitter must be >= 0, got {lr_jitter}")
    out = []
    for s in seeds:
        u = np.random.default_rng([int(s) & 0xFFFFFFFF, 0x1A]).uniform(-1.0, 1.0) if lr_jitter else 0.0
        out.append(float(task.lr) * math.exp(lr_jitter * u))
    return out


# ---- collect --------------------------------------------------------------------------------------------
def collect(task: Any, out_dir: Union[str, Path], runs: int = 16, steps: Optional[int] = None,
            save_every: int = 40, seeds: Optional[Sequence[int]] = None, lrs: Optional[Sequence[float]] = None,
            group: int = 8, resume: bool = True, progress: bool = True, *, lr_jitter: float = 0.0,
            mode: str = "auto", data_root: Union[str, Path, None] = None, ops: Optional[TaskOps] = None,
            stop_after: Optional[int] = None) -> Path:
    """Train ``runs`` models of ``task`` with AdamW and store their trajectories; returns ``out_dir/<task>``.

    ``task``: a registered name (``nowcast.tasks``) or a Task-like object (with ``ops`` for one that
    is not registered). ``steps`` defaults to the task's budget and is rounded down to a multiple of
    ``save_every``; saves are at steps ``0, save_every, 2*save_every, ..., steps``. ``seeds`` default to
    ``0..runs-1``; ``lrs`` default to the task's lr, times ``exp(lr_jitter * u)`` with ``u`` uniform in
    [-1, 1] drawn from the run's seed. ``mode``: ``"auto"`` (:data:`DEFAULT_MODE`), ``"vmap"`` (falls
    back to sequential, with a warning, for a model that cannot be vmapped) or ``"sequential"``.
    ``resume=False`` deletes an existing store and starts over.
    ``stop_after=n`` raises :class:`CollectionInterrupted` after ``n`` run-steps (tests).
    """
    task = _resolve_task(task)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ops = ops or task_ops(task, data_root)
    if runs < 1 or group < 1 or save_every < 1:
        raise ValueError(f"runs, group and save_every must be >= 1 (got {runs}, {group}, {save_every})")
    steps_asked = int(task.steps if steps is None else steps)
    n_intervals = steps_asked // save_every
    if n_intervals < 1:
        raise ValueError(f"steps={steps_asked} is less than save_every={save_every}: nothing to save after step 0")
    steps_eff = n_intervals * save_every
    if steps_eff != steps_asked:
        warnings.warn(f"steps={steps_asked} is not a multiple of save_every={save_every}; training to "
                      f"{steps_eff} steps (the last save)", stacklevel=2)
    n_saves = n_intervals + 1
    seeds = list(range(runs)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != runs:
        raise ValueError(f"seeds has {len(seeds)} entries for runs={runs}; give one seed per run")
    run_lrs = _lrs_for(task, seeds, lrs, lr_jitter)

    probe_model = ops.build_model(seeds[0])
    named = _named_params(probe_model)
    param_names = [n for n, _ in named]
    num_params = sum(p.numel() for _, p in named)
    del probe_model

    task_dir = Path(out_dir) / task.name
    settings = _jsonable({
        "task": task.name, "arch": dict(getattr(task, "arch", {}) or {}), "runs": runs, "steps": steps_eff,
        "save_every": save_every, "n_saves": n_saves, "group": group, "mode": None, "seeds": seeds,
        "lrs": run_lrs, "lr_jitter": float(lr_jitter) if lrs is None else None,
        "weight_decay": float(task.weight_decay), "batch_size": int(task.batch_size), "betas": list(BETAS),
        "eps": EPS, "num_params": num_params, "param_names": param_names,
        "param_shapes": [list(p.shape) for _, p in named]})
    store = _Store(task_dir)
    with store.lock():
        return _collect_locked(task, ops, store, settings, resume, mode, progress, stop_after)


def _collect_locked(task: Any, ops: TaskOps, store: _Store, settings: dict, resume: bool, mode: str,
                    progress: bool, stop_after: Optional[int]) -> Path:
    meta = store.open(settings, resume, mode)
    runs, n_saves, group = settings["runs"], settings["n_saves"], settings["group"]
    seeds, run_lrs = settings["seeds"], settings["lrs"]

    data = None
    if any(d < n_saves for d in meta["done"]):
        data = ops.load_data()
        # resolve the path once per store: a resumed store keeps its own
        if meta["mode"] is None:  # not resolved yet (a new store)
            resolved = DEFAULT_MODE if mode == "auto" else mode
            if resolved == "vmap":
                reason = _probe_vmap(ops, data, seeds, run_lrs, task.weight_decay, group)
                if reason is not None:
                    warnings.warn(f"{task.name}: the model cannot be trained under torch.vmap ({reason}); "
                                  "using the sequential path (one module and torch.optim.AdamW per run)",
                                  VmapFallbackWarning, stacklevel=3)
                    meta["vmap_fallback"] = reason
                    resolved = "sequential"
            meta["mode"] = resolved
            store.write_meta(meta)

    budget = [stop_after]
    for g, start in enumerate(range(0, runs, group)):
        idx = list(range(start, min(start + group, runs)))
        if all(meta["done"][r] == n_saves for r in idx):
            store.ckpt_path(g).unlink(missing_ok=True)  # a crash between the last meta write and the delete
            continue
        with torch.random.fork_rng(devices=[]):  # dropout RNG is seeded per group; leave the caller's alone
            _train_group(task, ops, data, store, meta, g, idx, progress, budget)
    return store.dir


class _Store:
    def __init__(self, task_dir: Path):
        self.dir = task_dir
        self.meta_path = task_dir / "meta.json"
        self.states_path = task_dir / "states.f16"
        self.losses_path = task_dir / "losses.npy"
        self.states: Optional[np.memmap] = None
        self.losses: Optional[np.ndarray] = None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One collector per store: an exclusive ``flock`` on ``.lock`` while collecting."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as f:
            try:
                import fcntl
            except ImportError:  # pragma: no cover - not POSIX: no locking
                yield
                return
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise CollectError(f"another collector is writing {self.dir}; wait for it to finish (or stop "
                                   "it) before running this command again") from None
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def ckpt_path(self, g: int) -> Path:
        return self.dir / f"resume_g{g}.pt"

    def open(self, settings: dict, resume: bool, mode: str) -> dict:
        shape = (settings["runs"], settings["n_saves"], settings["num_params"])
        if self.meta_path.exists() and resume:
            try:
                meta = json.loads(self.meta_path.read_text())
            except json.JSONDecodeError as e:
                raise CollectError(f"{self.meta_path} is not valid JSON ({e}); start over with --restart") from e
            if meta.get("format") != FORMAT:
                raise CollectError(f"{self.meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}; "
                                   "start over with --restart or use another --out directory")
            _check_same_settings(meta, settings, self.dir)
            fell_back = mode == "vmap" and meta.get("vmap_fallback")
            if mode != "auto" and meta["mode"] not in (None, mode) and not fell_back:
                raise CollectError(f"{self.dir} was collected with mode={meta['mode']!r}; resume it with that "
                                   "mode (or mode='auto'), or start over with --restart")
            for p in (self.states_path, self.losses_path):
                if not p.exists():
                    raise CollectError(f"{p} is missing although {self.meta_path} exists; start over with --restart")
            if self.states_path.stat().st_size != int(np.prod(shape)) * 2:
                raise CollectError(f"{self.states_path} has {self.states_path.stat().st_size} bytes, expected "
                                   f"{int(np.prod(shape)) * 2} for shape {shape}; start over with --restart")
            self.states = np.memmap(self.states_path, dtype=np.float16, mode="r+", shape=shape)
            self.losses = np.load(self.losses_path, mmap_mode="r+")
            if meta.get("torch") != torch.__version__ and any(d < settings["n_saves"] for d in meta["done"]):
                warnings.warn(f"{self.dir} was started with torch {meta.get('torch')}, resuming with "
                              f"{torch.__version__}: the continued runs may differ in the last bits", stacklevel=4)
            return meta
        # a fresh store (also when states exist without meta: nothing in them was complete)
        self.dir.mkdir(parents=True, exist_ok=True)
        for p in [self.meta_path, self.states_path, self.losses_path, *self.dir.glob("resume_g*.pt")]:
            p.unlink(missing_ok=True)
        self.states = np.memmap(self.states_path, dtype=np.float16, mode="w+", shape=shape)
        self.losses = np.lib.format.open_memmap(self.losses_path, mode="w+", dtype=np.float32,
                                                shape=shape[:2])
        self.losses[:] = np.nan
        self.states.flush()
        self.losses.flush()
        meta = {"format": FORMAT, **settings,
                "states": {"file": self.states_path.name, "dtype": "float16", "shape": list(shape),
                           "order": "C", "layout": "(runs, n_saves, num_params)"},
                "losses": {"file": self.losses_path.name, "dtype": "float32", "shape": list(shape[:2]),
                           "what": "losses[r, 0]: minibatch loss of the initial parameters; losses[r, k]: mean "
                                   "minibatch loss over the save_every steps that end at save k"},
                "save_steps": [k * settings["save_every"] for k in range(settings["n_saves"])],
                "optimizer": {"name": "AdamW", "betas": list(BETAS), "eps": EPS,
                              "weight_decay": settings["weight_decay"], "lr_schedule": "constant"},
                "done": [0] * settings["runs"], "group_wall_s": [], "wall_s": 0.0,
                "torch": torch.__version__, "numpy": np.__version__, "machine": _machine(),
                "vmap_fallback": None, "lossy_resumes": []}
        self.write_meta(meta)
        return meta

    def write_meta(self, meta: dict) -> None:
        _write_json_atomic(self.meta_path, meta)

    def write_save(self, idx: list[int], k: int, flat: torch.Tensor, loss: Optional[np.ndarray]) -> None:
        """States (and losses) of save ``k`` for runs ``idx``, flushed to disk."""
        a, b = idx[0], idx[-1] + 1
        self.states[a:b, k, :] = flat.detach().to(torch.float16).numpy()
        self.states.flush()
        if loss is not None:
            self.losses[a:b, k] = loss
        self.losses.flush()


def _train_group(task: Any, ops: TaskOps, data: Any, store: _Store, meta: dict, g: int, idx: list[int],
                 progress: bool, budget: list) -> None:
    se, n_saves, mode = meta["save_every"], meta["n_saves"], meta["mode"]
    seeds = [meta["seeds"][r] for r in idx]
    lrs = [meta["lrs"][r] for r in idx]
    shash = _settings_hash(meta)
    done = min(meta["done"][r] for r in idx)
    ckpt_path = store.ckpt_path(g)

    models = [ops.build_model(s) for s in seeds]
    trainer = _make_trainer(mode, models, lrs, meta["weight_decay"], ops.loss_fn)
    ckpt = torch.load(ckpt_path, weights_only=True) if ckpt_path.exists() else None
    if ckpt is not None and (ckpt.get("settings") != shash or ckpt.get("runs") != idx or ckpt.get("mode") != mode):
        raise CollectError(f"{ckpt_path} belongs to other settings than {store.meta_path}; delete it (the "
                           "group then resumes, lossily, from the fp16 store) or start over with --restart")
    if ckpt is not None and ckpt["saves"] in (done, done + 1):
        # saves == done + 1: the crash came after the states and the checkpoint were written but before
        # the meta; the states of that save are on disk (they are flushed before the checkpoint)
        trainer.load_state_dict(ckpt["trainer"])
        torch.set_rng_state(ckpt["rng"])
        step, done = ckpt["step"], ckpt["saves"]
    elif done <= 1:
        step, done = 0, 0  # from scratch: the initial parameters are a deterministic function of the seeds
        torch.manual_seed(seeds[0])
    else:
        k = done - 1
        warnings.warn(f"{task.name} runs {idx[0]}-{idx[-1]}: no usable float32 resume checkpoint ({ckpt_path}); "
                      f"resuming from the fp16 store at save {k} (step {k * se}) with fresh AdamW moments -- "
                      "the rest of these trajectories is not what an uninterrupted run would give", stacklevel=4)
        trainer.load_flat(torch.from_numpy(np.asarray(store.states[idx[0]:idx[-1] + 1, k], dtype=np.float32)))
        torch.manual_seed(seeds[0] + k)
        step = k * se
        meta["lossy_resumes"].append({"group": g, "runs": idx, "save": k})
    if done == 0:
        store.write_save(idx, 0, trainer.flat(), None)
        for r in idx:
            meta["done"][r] = 1
        store.write_meta(meta)
        done = 1
    for r in idx:
        meta["done"][r] = done

    iters = [ops.batches(data, s, step) for s in seeds]
    while len(meta["group_wall_s"]) <= g:
        meta["group_wall_s"].append(0.0)
    t_last = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=meta["steps"], initial=step, unit="step", dynamic_ncols=True,
                   desc=f"{task.name} runs {idx[0]}-{idx[-1]} ({len(idx)}, {mode})")
    try:
        first_loss: Optional[torch.Tensor] = None
        for k in range(done, n_saves):
            loss_sum = torch.zeros(len(idx), dtype=torch.float64)
            for _ in range(se):
                xs, ys = zip(*[next(it) for it in iters])
                losses = trainer.step(list(xs), list(ys))
                if step == 0:
                    first_loss = losses.clone()
                loss_sum += losses.double()
                step += 1
                if bar is not None:
                    bar.update(1)
                    if step % 10 == 0:
                        bar.set_postfix(loss=f"{float(losses.mean()):.4f}", refresh=False)
                if budget[0] is not None:
                    budget[0] -= len(idx)
                    if budget[0] <= 0:
                        raise CollectionInterrupted(f"stop_after reached at step {step} of runs {idx[0]}-{idx[-1]}")
            mean_loss = (loss_sum / se).float().numpy()
            store.write_save(idx, k, trainer.flat(), mean_loss)
            if first_loss is not None:
                store.losses[idx[0]:idx[-1] + 1, 0] = first_loss.float().numpy()
                store.losses.flush()
                first_loss = None
            if k + 1 < n_saves:
                _save_torch_atomic(ckpt_path, {"settings": shash, "runs": idx, "mode": mode, "step": step,
                                               "saves": k + 1, "trainer": trainer.state_dict(),
                                               "rng": torch.get_rng_state()})
            now = time.perf_counter()
            meta["group_wall_s"][g] += now - t_last
            meta["wall_s"] = sum(meta["group_wall_s"])
            t_last = now
            for r in idx:
                meta["done"][r] = k + 1
            store.write_meta(meta)
        ckpt_path.unlink(missing_ok=True)
    finally:
        if bar is not None:
            bar.close()


# ---- reading ---------------------------------------------------------------------------------------------
@dataclass
class Trajectories:
    """A collected store. ``states[r, k]`` is run ``r``'s flat parameter vector at step
    ``meta["save_steps"][k]``; only ``states[r, :meta["done"][r]]`` is written."""

    states: np.memmap
    meta: dict
    complete_runs: list[int]
    losses: np.ndarray
    path: Path

    @property
    def done(self) -> list[int]:
        return list(self.meta["done"])


def load_trajectories(path: Union[str, Path], mmap_mode: str = "r") -> Trajectories:
    """Open a store: the task directory (``out_dir/<task>``), its ``meta.json`` or its ``states.f16``."""
    p = Path(path)
    task_dir = p.parent if p.is_file() or p.suffix in (".json", ".f16") else p
    meta_path = task_dir / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"no trajectory store at {task_dir} (no meta.json); collect one with "
                                "`python -m nowcast.collect --task TASK --out DIR`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise CollectError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    shape = tuple(meta["states"]["shape"])
    states = np.memmap(task_dir / meta["states"]["file"], dtype=np.float16, mode=mmap_mode, shape=shape)
    losses = np.load(task_dir / meta["losses"]["file"], mmap_mode=mmap_mode)
    complete = [r for r, d in enumerate(meta["done"]) if d == meta["n_saves"]]
    return Trajectories(states=states, meta=meta, complete_runs=complete, losses=losses, path=task_dir)


# ---- throughput ---------------------------------------------------------------------------------------------
def benchmark(task: Any, runs: int = 8, steps: int = 10, warmup: int = 2,
              modes: Sequence[str] = ("vmap", "sequential"), data_root: Union[str, Path, None] = None,
              ops: Optional[TaskOps] = None) -> dict[str, dict[str, float]]:
    """Time training steps of ``runs`` runs trained together, per mode (no store is written).

    The modes take turns step by step (alternating which goes first), so a machine shared with
    other jobs slows them alike. Returns ``{mode: {"run_steps_per_s", "best_run_steps_per_s",
    "group_steps_per_s"}}`` from the median and the fastest step time; one run-step is one step of
    one run, so the numbers compare the paths directly.
    """
    task = _resolve_task(task)
    ops = ops or task_ops(task, data_root)
    data = ops.load_data()
    seeds = list(range(runs))
    lrs = [float(task.lr)] * runs
    trainers = {m: _make_trainer(m, [ops.build_model(s) for s in seeds], lrs, task.weight_decay, ops.loss_fn)
                for m in modes}
    iters = [ops.batches(data, s, 0) for s in seeds]
    times: dict[str, list[float]] = {m: [] for m in modes}
    order = list(modes)
    for i in range(warmup + steps):
        xs, ys = zip(*[next(it) for it in iters])
        for m in (order if i % 2 == 0 else order[::-1]):
            t = time.perf_counter()
            trainers[m].step(list(xs), list(ys))
            if i >= warmup:
                times[m].append(time.perf_counter() - t)
    out: dict[str, dict[str, float]] = {}
    for m, ts in times.items():
        med, best = float(np.median(ts)), min(ts)
        out[m] = {"run_steps_per_s": runs / med, "best_run_steps_per_s": runs / best, "group_steps_per_s": 1 / med}
    return out


# ---- command line -------------------------------------------------------------------------------------------
def _int_list(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _float_list(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nowcast.collect",
                                 description="Collect AdamW training trajectories of a task into a memory-mapped "
                                             "fp16 store (out/<task>/states.f16 + meta.json), resumable. "
                                             "See docs/collect.md.")
    ap.add_argument("--task", required=True, help="registered task name (nowcast.tasks), e.g. fm16")
    ap.add_argument("--runs", type=int, default=16, help="number of runs (default 16)")
    ap.add_argument("--out", default="trajectories", help="output directory (default ./trajectories)")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default: the task's budget)")
    ap.add_argument("--save-every", type=int, default=40, help="save the parameters every N steps (default 40)")
    ap.add_argument("--group", type=int, default=8,
                    help="runs trained together: one vmap batch, one resume checkpoint and one progress bar "
                         "per group (default 8)")
    ap.add_argument("--seeds", type=_int_list, default=None, help="comma-separated seeds (default 0..runs-1)")
    ap.add_argument("--lrs", type=_float_list, default=None, help="comma-separated per-run learning rates "
                                                                   "(default: the task's lr)")
    ap.add_argument("--lr-jitter", type=float, default=0.0,
                    help="per-run lr = task lr * exp(J*u), u ~ U(-1, 1) from the run's seed (default 0)")
    ap.add_argument("--mode", choices=MODES, default="auto",
                    help=f"vmap (batched; falls back to sequential if the model cannot be vmapped), sequential "
                         f"(reference), auto (default): {DEFAULT_MODE}")
    ap.add_argument("--data-root", default=None, help="data directory (default: nowcast.data.data_dir())")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: measured fastest and steadiest on a shared 2-core CPU, "
                         "see docs/collect.md; run two tasks at once to use two cores; 0 = torch's default)")
    ap.add_argument("--restart", action="store_true", help="delete an existing store and start over")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object (store, runs, complete runs, saves, parameters, seconds) instead of "
                         "the summary line")
    ap.add_argument("--benchmark", type=int, metavar="STEPS", default=None,
                    help="only time STEPS steps of --group runs with each path and print steps/s")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _run_cli(args)
    finally:
        torch.set_num_threads(threads)  # main() may be called from Python (tests)


def _run_cli(args: argparse.Namespace) -> int:
    from .data import DataMissingError

    try:
        if args.benchmark is not None:
            res = benchmark(args.task, runs=args.group, steps=args.benchmark, data_root=args.data_root)
            if args.json:
                print(json.dumps({"task": args.task, "runs": args.group, "steps": args.benchmark,
                                  "threads": torch.get_num_threads(), "modes": res}))
                return 0
            print(f"{args.task}: {args.group} runs, {args.benchmark} steps, {torch.get_num_threads()} threads")
            for mode, r in res.items():
                print(f"  {mode:10s} {r['run_steps_per_s']:8.2f} run-steps/s median step, "
                      f"{r['best_run_steps_per_s']:8.2f} fastest step")
            return 0
        path = collect(args.task, args.out, runs=args.runs, steps=args.steps, save_every=args.save_every,
                       seeds=args.seeds, lrs=args.lrs, group=args.group, resume=not args.restart,
                       progress=not args.no_progress, lr_jitter=args.lr_jitter, mode=args.mode,
                       data_root=args.data_root)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume from the last save", file=sys.stderr)
        return 130
    except (DataMissingError, CollectError, KeyError, ValueError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
    t = load_trajectories(path)
    if args.json:
        print(json.dumps({"store": str(path), "task": t.meta["task"], "runs": t.meta["runs"],
                          "complete_runs": [int(r) for r in t.complete_runs], "n_saves": t.meta["n_saves"],
                          "save_every": t.meta["save_every"], "num_params": t.meta["num_params"],
                          "mode": t.meta["mode"], "wall_s": t.meta["wall_s"]}))
        return 0
    print(f"{path}: {len(t.complete_runs)}/{t.meta['runs']} runs complete, {t.meta['n_saves']} saves of "
          f"{t.meta['num_params']} parameters ({t.meta['mode']}, {t.meta['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One training run of a task, with AdamW alone or AdamW wrapped in the NiNo optimizer.

:func:`run_training` is what the demo and the acceleration benchmark call. For a given ``seed``
every method starts from the same weights (``build_model(task, seed)``) and sees the same batch
stream (``batches(task, data, seed)``), aligned **by step index**: on a nowcast step the wrapper
replaces the base step by a nowcast and needs no gradients, so the loop skips forward/backward
but still draws (and discards) that step's batch. Step ``s`` of every method therefore uses
batch ``s`` of the stream, and the scores at a given step are comparable across methods.

The base optimizer is AdamW with the task's learning rate and weight decay, constant over the run
(no schedule, as in the paper's protocol). Scores are taken at step 0, every ``eval_every`` steps
and after the last step, on the task's full held-out set.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from .tasks import (Task, TaskData, batches, build_model, evaluate, example_inputs, get_task, load_task_data, loss_fn,
                    target_check, misclassified, accuracy)

__all__ = ["run_training", "steps_to_target"]

LogLike = Union[None, Callable[[dict], Any], str, Path]


def steps_to_target(task: Task, eval_steps: list[int], scores: list[float]) -> Optional[int]:
    """The first evaluated step whose score reaches the task's target (None if none does)."""
    for s, v in zip(eval_steps, scores):
        if task.reached(v):
            return s
    return None


def _logger(log: LogLike) -> Optional[Callable[[dict], None]]:
    if log is None:
        return None
    if callable(log):
        return log
    path = Path(log)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")

    def write(record: dict) -> None:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    return write


def run_training(task: Union[str, Task], seed: int, method: str = "adamw", nowcaster: Any = None,
                 steps: Optional[int] = None, eval_every: Optional[int] = None, data: Optional[TaskData] = None,
                 period: Any = None, ctx: int = 5, progress: bool = True, log: LogLike = None,
                 guard: Optional[float] = None, max_k: int = 40, hold: Optional[str] = None,
                 permute: Optional[int] = None, min_k: int = 1, gate: Optional[float] = None,
                 gate_every_cycle: bool = False) -> dict:
    """Train ``build_model(task, seed)`` for ``steps`` steps and return a JSON-serialisable record.

    Args:
        task: a :class:`~nowcast.tasks.Task` or its registry name.
        seed: model initialisation and batch stream.
        method: the label stored in the record (with a nowcaster and the default ``"adamw"``, the
            label becomes ``"adamw+<NowcasterClass>"``).
        nowcaster: ``None`` for AdamW alone, else any nowcaster (NiNoGNN, WNNPlus, Linefit,
            LinefitPlus); AdamW is then wrapped in :class:`nowcast.optim.NiNo` with ``period``
            (an int or a :class:`nowcast.schedule.DynamicPeriod`; default ``task.period``, 1000 for
            the paper's tasks), ``ctx``, ``total_steps=steps``
            and the published k-decay from ``max_k`` (default 40) down to 1, and ``hold`` (``NiNo(hold=)``:
            None, the default, nowcasts everything; ``"auto"`` holds biases and norm parameters of
            models with normalisation layers; the record stores what it resolved to). A graph, if the nowcaster needs one, is compiled from
            ``example_inputs(task)``.
        steps, eval_every: default the task's.
        data: the task's loaded data (loaded here when None; pass it to share one load across runs).
        progress: show a tqdm progress bar.
        log: None, a callable receiving one dict per evaluation, or a path (JSON lines, overwritten).
        guard: with a nowcaster, check every nowcast on that step's batch: the wrapper gets
            ``spike_factor=guard``, ``on_reject="base"`` and a closure (the training loss and its
            gradients), and a nowcast whose training loss exceeds ``guard`` times the loss before
            it is undone and AdamW takes that step instead, on the same batch; a run whose every
            nowcast is undone is the AdamW run exactly. ``1.0`` rejects any increase. None: no check.
        min_k: ``NiNo(min_k=)``: nowcasts whose horizon is below it are skipped and AdamW takes the
            step (2 drops the published decay's final ``k=1`` nowcast, at the run's last step).
        gate: with a nowcaster, wrap it in :class:`nowcast.gate.SkillGate` with this threshold (the
            wrapper then records ``2 * ctx`` states per cycle; at the first nowcast the nowcaster is
            backtested on the cycle's first half, and the run nowcasts only if it beat no change by
            that ratio, otherwise the parameters stay put at every nowcast; ``gate_every_cycle``
            decides at every nowcast instead). The record gets ``gate``, ``gate_every_cycle`` and
            ``gate_log``. None: no gate.
        permute: None, or a seed: start from the initial weights moved by a random element of the
            model's inferred neuron permutation group (``neugraph.trace(...).sample_symmetry`` drawn
            from a generator seeded with ``permute``). The network computes the same function, and
            AdamW and the nowcaster's graph are permutation-equivariant, so in exact arithmetic the run
            is the unpermuted one with its neurons relabelled: the same scores. In floating point the
            sums run in another order, so the run is a *replica* whose difference from the original
            measures how sensitive the result is to rounding (``benchmarks/replicas.py``).

    Until the target is first reached, the target is also checked every ``task.target_every`` steps
    (:func:`~nowcast.tasks.target_check`); a check that reaches it is recorded as an evaluation, so
    ``steps_to_target`` is exact to ``target_every`` steps.

    Returns a dict with ``task, seed, method, steps, eval_every, target_every, eval_steps, scores, train_loss``
    (mean training loss since the previous evaluation, None at step 0), ``steps_to_target, target,
    metric, final_score, wall_time_s`` (whole run), ``eval_time_s``, ``nowcasts``,
    ``nowcasts_rejected``, ``nowcast_steps``, ``period``, ``max_k``, ``hold`` and ``held_values``.
    """
    task = get_task(task)
    steps = task.steps if steps is None else int(steps)
    eval_every = task.eval_every if eval_every is None else int(eval_every)
    if steps < 1 or eval_every < 1:
        raise ValueError(f"steps and eval_every must be >= 1, got steps={steps}, eval_every={eval_every}")
    if guard is not None and not (isinstance(guard, (int, float)) and guard >= 1):
        raise ValueError(f"guard must be None or a number >= 1 (1.0 undoes any nowcast that raises the loss), "
                         f"got {guard!r}")
    if period is None:
        period = task.period
    if nowcaster is not None and method == "adamw":
        method = f"adamw+{type(nowcaster).__name__}"
    if gate is not None and nowcaster is not None:
        from .gate import SkillGate

        nowcaster = SkillGate(nowcaster, gate, every_cycle=gate_every_cycle)
        ctx = nowcaster.ctx
    emit = _logger(log)
    t_start = time.perf_counter()
    if data is None:
        data = load_task_data(task)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # nothing in the loop draws from it today; pins anything that might
        model = build_model(task, seed)
        if permute is not None:
            permute_model(model, task, permute)
        base = torch.optim.AdamW(model.parameters(), lr=task.lr, weight_decay=task.weight_decay)
        opt: torch.optim.Optimizer = base
        wrapper = None
        if nowcaster is not None:
            from .optim import NiNo, NowcastRejectedWarning

            wrapper = NiNo(model, base, nowcaster, period=period, ctx=ctx, total_steps=steps,
                           example_inputs=example_inputs(task) if getattr(nowcaster, "needs_graph", True) else None,
                           spike_factor=guard, on_reject="base", max_k=max_k, hold=hold, min_k=min_k)
            opt = wrapper

        eval_steps: list[int] = []
        scores: list[float] = []
        train_loss: list[Optional[float]] = []
        nowcast_steps: list[int] = []
        nowcast_log: list[dict] = []  # the wrapper's record of each nowcast (k, accepted, losses)
        eval_time = 0.0
        loss_sum, loss_n = 0.0, 0

        # until the target is first reached, also check it every ``check_every`` steps (exact score recorded)
        check_every = task.target_every if 0 < task.target_every < eval_every else 0
        reached = False
        hard: Optional[torch.Tensor] = None  # images the last full evaluation got wrong: checked first

        def do_eval(step: int, check_only: bool = False) -> Optional[float]:
            nonlocal eval_time, loss_sum, loss_n, reached, hard
            t0 = time.perf_counter()
            if check_only:
                score = target_check(task, model, data, hard_first=hard)
            elif check_every and task.kind == "vision":
                hard = misclassified(task, model, data)
                score = accuracy(hard)
            else:
                score = evaluate(task, model, data)
            eval_time += time.perf_counter() - t0
            if score is None:
                return None
            reached = reached or task.reached(score)
            eval_steps.append(step)
            scores.append(score)
            mean_loss = loss_sum / loss_n if loss_n else None
            train_loss.append(mean_loss)
            loss_sum, loss_n = 0.0, 0
            if emit is not None:
                emit({"task": task.name, "seed": seed, "method": method, "step": step, "score": score,
                      "train_loss": mean_loss, "time_s": round(time.perf_counter() - t_start, 3)})
            return score

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc=f"{task.name} {method} seed {seed}", unit="step", dynamic_ncols=True,
                       leave=True)
        score = do_eval(0)
        stream = batches(task, data, seed)
        for step in range(steps):
            inputs, targets = next(stream)  # drawn on every step, nowcast or not: batches stay aligned
            opt.zero_grad(set_to_none=True)
            if wrapper is None or wrapper.need_grads:
                loss = loss_fn(task, model, inputs, targets)
                loss.backward()
                lv = float(loss.detach())
                if math.isfinite(lv):
                    loss_sum += lv
                    loss_n += 1
                opt.step()
            else:
                nowcast_steps.append(step)
                if guard is None:
                    opt.step()
                else:
                    def probe(inputs: Any = inputs, targets: Any = targets) -> torch.Tensor:
                        opt.zero_grad(set_to_none=True)
                        probe_loss = loss_fn(task, model, inputs, targets)
                        probe_loss.backward()  # used only when the nowcast is undone and AdamW steps
                        return probe_loss.detach()

                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", NowcastRejectedWarning)  # counted in the record
                        lv = float(opt.step(probe))
                    if wrapper.state["last_nowcast"]["base_step"] and math.isfinite(lv):
                        loss_sum += lv  # AdamW's step on this batch, as on any other step
                        loss_n += 1
                if wrapper is not None and wrapper.state["last_nowcast"] is not None:
                    nowcast_log.append(dict(wrapper.state["last_nowcast"]))
            done = step + 1
            if done % eval_every == 0 or done == steps:
                score = do_eval(done)
                if bar is not None:
                    bar.set_postfix({task.metric[:4]: f"{score:.2f}"}, refresh=False)
            elif check_every and not reached and done % check_every == 0:
                do_eval(done, check_only=True)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()

    wall = time.perf_counter() - t_start
    st = wrapper.state if wrapper is not None else {}
    return {
        "task": task.name, "seed": seed, "method": method, "steps": steps, "eval_every": eval_every,
        "target_every": check_every,
        "metric": task.metric, "target": task.target, "eval_steps": eval_steps, "scores": scores,
        "train_loss": train_loss, "steps_to_target": steps_to_target(task, eval_steps, scores),
        "final_score": scores[-1], "wall_time_s": round(wall, 3), "eval_time_s": round(eval_time, 3),
        "nowcasts": int(st.get("nowcasts", 0)), "nowcasts_rejected": int(st.get("nowcasts_rejected", 0)),
        "nowcasts_skipped": int(st.get("nowcasts_skipped", 0)), "min_k": min_k if nowcaster is not None else None,
        "nowcast_steps": nowcast_steps, "period": _period_repr(period) if nowcaster is not None else None,
        "ctx": ctx if nowcaster is not None else None, "guard": guard if nowcaster is not None else None,
        "max_k": max_k if nowcaster is not None else None,
        "hold": wrapper.hold if wrapper is not None else None, "permute": permute,
        "held_values": wrapper.num_held if wrapper is not None else None,
        "gate": gate if wrapper is not None else None,
        "gate_every_cycle": bool(gate_every_cycle) if wrapper is not None and gate is not None else None,
        "gate_log": list(nowcaster.log) if wrapper is not None and gate is not None else None,
        "nowcast_log": nowcast_log, "lr": task.lr, "weight_decay": task.weight_decay,
        "batch_size": task.batch_size, "torch_threads": torch.get_num_threads(),
    }


@torch.no_grad()
def permute_model(model: torch.nn.Module, task: Union[str, Task], seed: int) -> None:
    """Move ``model``'s parameters and buffers, in place, by a random element of its inferred
    permutation group (drawn from a generator seeded with ``seed``); the function is unchanged."""
    import neugraph

    ir = neugraph.trace(model, example_inputs(task))
    perm = ir.sample_symmetry(torch.Generator().manual_seed(int(seed)))
    moved = perm.apply(model.state_dict())
    state = model.state_dict()  # shared storage: copying into it writes the module's tensors
    for name, value in moved.items():
        if value is not state[name]:
            state[name].copy_(value)


def _period_repr(period: Any) -> Any:
    if isinstance(period, int):
        return period
    from dataclasses import asdict, is_dataclass

    if is_dataclass(period):
        return {"type": type(period).__name__, **asdict(period)}
    return repr(period)

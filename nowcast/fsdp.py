"""NiNo for FSDP2 (``torch.distributed.fsdp.fully_shard``): sharded history, gather per block.

Under FSDP each rank holds a shard of every parameter (a ``DTensor``). :class:`ShardedNiNo`:

- records only this rank's shards, so the history is sharded like the parameters
  (``(ctx - 1) * num_params / world`` values per rank);
- at a nowcast, gathers one parameter tensor ("block") at a time (an all-gather per recorded
  state) and copies it into the ``(num_params, ctx)`` states on the ``src`` rank; the others keep
  no more than one gathered block at a time;
- predicts on ``src`` (a graph nowcaster needs the whole graph: its messages cross blocks), checks
  the prediction there, then broadcasts it block by block; every rank copies its own shard.

Peak extra memory at a nowcast: on ``src`` the states (``num_params * ctx`` float32) and the
nowcaster's own working memory, as in a single process; elsewhere one block. ``memory_plan()``
gives the figures for a model. With ``step(closure)`` the closure's loss is averaged over the
ranks, so every rank accepts or rejects the same nowcast.

The graph of a graph nowcaster must be compiled before ``fully_shard`` (``torch.export`` does not
capture FSDP modules): ``graph = neugraph.compile(model, x); fully_shard(...);
ShardedNiNo(model, base, nowcaster, graph=graph, ...)``. Checkpoints are per rank, like FSDP's
sharded optimizer state: each rank saves and loads its own ``state_dict()``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from .distributed import _DTYPES, _comm_device, _require_dist, averaged_closure
from .optim import Closure, NiNo, NowcastError

__all__ = ["ShardedNiNo"]


def _is_dtensor(p: torch.Tensor) -> bool:
    return hasattr(p, "to_local") and hasattr(p, "placements") and hasattr(p, "device_mesh")


class ShardedNiNo(NiNo):
    """:class:`nowcast.NiNo` for FSDP2-sharded models (see the module docstring).

    Args:
        src: the global rank that holds the states and predicts.
        group: the process group for the prediction's broadcast and the loss average (default: the
            world; the gathers use each parameter's own device mesh).
        *args, **kwargs: as for :class:`nowcast.NiNo`; a graph nowcaster needs ``graph=``.
    """

    def __init__(self, model_or_params: Any, base_optimizer: torch.optim.Optimizer, nowcaster: Any, *args: Any,
                 src: int = 0, group: Optional[dist.ProcessGroup] = None, **kwargs: Any) -> None:
        _require_dist()
        if getattr(nowcaster, "needs_graph", False) and kwargs.get("graph") is None:
            raise ValueError(f"{type(nowcaster).__name__} needs a neural graph, and an FSDP-sharded model cannot be "
                             "compiled: compile it before fully_shard, graph = neugraph.compile(model, example_inputs, "
                             "profile='nino'), and pass ShardedNiNo(..., graph=graph)")
        super().__init__(model_or_params, base_optimizer, nowcaster, *args, **kwargs)
        self.src, self.group, self.rank = src, group, dist.get_rank()
        self.world_size = dist.get_world_size(group)
        local_offset = 0
        self._local_offsets: dict[int, int] = {}
        for i in self._tracked:
            self._local_offsets[i] = local_offset
            local_offset += self._local(self._params[i]).numel()
        self.num_tracked = local_offset  # this rank's share: history entries have this size
        self._history_here = True

    @staticmethod
    def _local(p: torch.Tensor) -> torch.Tensor:
        """This rank's shard (the tensor itself when it is not sharded)."""
        return p.to_local() if _is_dtensor(p) else p

    @staticmethod
    def _full(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """The whole tensor whose shard on this rank is ``local`` (a collective when sharded)."""
        if not _is_dtensor(p):
            return local
        from torch.distributed.tensor import DTensor

        d = DTensor.from_local(local, device_mesh=p.device_mesh, placements=p.placements, shape=p.shape,
                               stride=p.stride(), run_check=False)
        return d.full_tensor()

    @staticmethod
    def _shard_of(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece of ``full`` (no communication)."""
        if not _is_dtensor(p):
            return full
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()

    def memory_plan(self) -> dict[str, int]:
        """Bytes this rank needs for NiNo: its history shard, and at a nowcast the states (``src``
        only) and the largest gathered block."""
        item = torch.empty(0, dtype=self.history_dtype).element_size()
        largest = max((p.numel() * 4 for p in self._params), default=0)
        return {"history_bytes": (self.ctx - 1) * self.num_tracked * item,
                "states_bytes": self.num_params * self.ctx * 4 if self.rank == self.src else 0,
                "largest_block_bytes": largest}

    # ---- recording and the nowcast -------------------------------------------------------------
    def _record(self, m: int) -> None:
        history = self.state["history"]
        if len(history) >= m:
            return
        if len(history) != m - 1:
            raise RuntimeError(f"NiNo history has {len(history)} states at the {m}-th recording point; "
                               "the state was edited or loaded inconsistently")
        flat = torch.empty(self.num_tracked, dtype=self.history_dtype, device=self.history_device)
        for i in self._tracked:
            local, o = self._local(self._params[i]), self._local_offsets[i]
            flat[o: o + local.numel()].copy_(local.detach().reshape(-1))
        history.append(flat)

    def _gather_states(self) -> Optional[torch.Tensor]:
        """(num_params, ctx) float32 on ``src`` (None elsewhere), gathered one block at a time."""
        is_src = self.rank == self.src
        states = torch.empty(self.num_params, self.ctx, dtype=torch.float32,
                             device=self.nowcast_device) if is_src else None
        history = self.state["history"]
        for i, p in enumerate(self._params):
            o, n = self._offsets[i], p.numel()
            local = self._local(p).detach()
            if i in self._local_offsets:
                lo, ln = self._local_offsets[i], local.numel()
                cols = [h[lo: lo + ln].view(local.shape).to(local.dtype) for h in history] + [local]
            else:
                cols = [local]
            for t, c in enumerate(cols):
                full = self._full(p, c.contiguous())
                if states is not None:
                    if len(cols) == 1:
                        states[o: o + n].copy_(full.reshape(-1, 1).expand(n, self.ctx))
                    else:
                        states[o: o + n, t].copy_(full.reshape(-1))
                del full
        return states

    def _broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=self.src, group=self.group)
        return box[0]

    def _nowcast(self, closure: Optional[Closure]) -> Any:
        st = self.state
        s, cycle = st["step"], st["cycle"]
        assert self.schedule is not None and self.nowcaster is not None
        if len(st["history"]) != self.ctx - 1:
            raise RuntimeError(f"NiNo expected {self.ctx - 1} recorded states at the nowcast of step {s}, "
                               f"found {len(st['history'])}; the state was edited or loaded inconsistently")
        k = self.schedule.k(cycle, s)
        if closure is not None:
            closure = averaged_closure(closure, self.group)
        loss_before = None
        if closure is not None:
            with torch.enable_grad():
                loss_before = closure()
        states = self._gather_states()
        # on src: predict and check; then everyone learns the outcome
        outcome: dict[str, Any] = {"error": None, "reason": None, "dtype": 0}
        pred = None
        name = type(self.nowcaster).__name__
        if states is not None:
            try:
                with torch.no_grad():
                    pred = self.nowcaster.predict(self.graph, states, k)
            except Exception as e:
                outcome["error"] = f"{name}.predict failed at step {s} (k={k}) on rank {self.src}: " \
                                   f"{type(e).__name__}: {e}"
            else:
                if not isinstance(pred, torch.Tensor) or tuple(pred.shape) != (self.num_params,):
                    got = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
                    outcome["error"] = f"{name}.predict returned {got}; expected ({self.num_params},)"
                else:
                    pred = pred if pred.dtype in _DTYPES else pred.float()
                    outcome["dtype"] = _DTYPES.index(pred.dtype)
                    outcome["reason"] = self._bad_values(pred)
            del states
        outcome = self._broadcast_object(outcome)
        if outcome["error"] is not None:
            raise NowcastError(f"{outcome['error']}. The model's parameters and NiNo's state were not changed; "
                               "calling step() again retries the nowcast")
        reason = outcome["reason"]
        loss, loss_after = loss_before, None
        if reason is None:
            backup = [self._local(self._params[i]).detach().clone() for i in self._tracked] if closure else None
            self._write_blocks(pred, _DTYPES[outcome["dtype"]])
            if closure is not None:
                try:
                    with torch.enable_grad():
                        loss_after = closure()
                except BaseException:
                    self._restore(backup)
                    raise
                reason = self._loss_problem(loss_before, loss_after)
                if reason is None:
                    loss = loss_after
                else:
                    self._restore(backup)
        self._finish(s, k, reason, loss_before, loss_after)
        return loss

    @torch.no_grad()
    def _write_blocks(self, pred: Optional[torch.Tensor], dtype: torch.dtype) -> None:
        """Broadcast the prediction one tracked parameter at a time; each rank writes its shard."""
        for i in self._written:  # the same list on every rank: the broadcasts pair up
            p, o = self._params[i], self._offsets[i]
            n = p.numel()
            dev = _comm_device(self.group, pred.device if pred is not None else self.nowcast_device)
            block = pred[o: o + n].to(dev).contiguous() if pred is not None else torch.empty(n, dtype=dtype,
                                                                                             device=dev)
            dist.broadcast(block, src=self.src, group=self.group)
            local = self._local(p)
            local.copy_(self._shard_of(p, block.view(p.shape).to(device=local.device, dtype=local.dtype)))
            del block

    @torch.no_grad()
    def _restore(self, backup: Optional[list[torch.Tensor]]) -> None:
        assert backup is not None
        for i, b in zip(self._tracked, backup):
            self._local(self._params[i]).copy_(b)

"""NiNo under ``torch.distributed`` data parallelism (DDP): every rank keeps identical parameters.

Under DDP every rank holds a full replica; gradients are all-reduced, so every base step is the
same on every rank. A nowcast has no gradients to reduce, so :class:`DistributedNiNo` makes it the
same on every rank in one of two ways (``sync=``; measured in ``docs/distributed.md``):

- ``"broadcast"`` (default): only ``src`` records the history and predicts; the prediction is
  broadcast. Identical parameters by construction, whatever the hardware; the other ranks hold no
  history (``(ctx - 1) * num_params`` values less each) and leave their cores or accelerator to
  other work; each nowcast costs one broadcast of ``num_params`` values.
- ``"everywhere"``: every rank records its own history and computes the nowcast from identical
  inputs. A deterministic nowcaster on the same hardware and library versions gives bitwise the
  same result with no communication, at ``ranks`` times the compute and history memory.

With ``verify=True`` (default) a 16-byte fingerprint of the parameters is all-gathered after each
nowcast; if a rank differs, the ``src`` rank's parameters are broadcast to all and a
:class:`RanksDivergedWarning` says so.

With ``step(closure)`` the closure's loss is averaged over the ranks before the safety check, so
every rank accepts or rejects the same nowcast.

Helpers for any data-parallel loop: :func:`param_fingerprint`, :func:`params_identical`,
:func:`assert_identical` and :func:`broadcast_params`.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable, Optional, Union

import torch
import torch.distributed as dist

from .optim import Closure, NiNo, _as_float, unwrap_model

__all__ = ["DistributedNiNo", "RanksDivergedWarning", "param_fingerprint", "params_identical",
           "assert_identical", "broadcast_params", "averaged_closure"]

ParamsLike = Union[torch.nn.Module, Iterable[torch.Tensor]]

# dtypes a prediction may have when it is broadcast (its index travels in the header)
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BLOCK = 256  # elements per block of the fingerprint's position-weighted sum


class RanksDivergedWarning(RuntimeWarning):
    """Ranks held different parameters after a nowcast; ``src``'s were broadcast to all."""


def _require_dist() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group(...) "
                           "in every process first (torchrun does it for you), or use nowcast.NiNo in a "
                           "single process")


def _params(model_or_params: ParamsLike) -> list[torch.Tensor]:
    if isinstance(model_or_params, torch.nn.Module):
        return list(unwrap_model(model_or_params).parameters())
    out, seen = [], set()
    for p in model_or_params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _comm_device(group: Optional[dist.ProcessGroup], like: torch.device) -> torch.device:
    """Where a tensor must be for a collective of ``group``'s backend (gloo: CPU; nccl: CUDA)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return like if like.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    if "gloo" in backend and "nccl" not in backend:
        return torch.device("cpu")
    return like  # a multi-device backend ("cpu:gloo,cuda:nccl") takes the tensor where it is


def param_fingerprint(model_or_params: ParamsLike) -> torch.Tensor:
    """(2,) int64 on the CPU: two sums of the parameters' bit patterns, one weighted by position.

    The elements of each tensor are summed as integers (their bits) in blocks of ``_BLOCK``; the
    block sums are added once plainly and once weighted by block position. Integer sums wrap and are
    associative, so equal parameters give equal fingerprints on every rank whatever the summation
    order; any changed bit changes the plain sum unless other changes cancel it exactly. Cost: one
    read of the parameters (no int64 copy of them)."""
    total = torch.zeros(2, dtype=torch.int64)
    for i, p in enumerate(_params(model_or_params)):
        flat = p.detach().reshape(-1)
        n = flat.numel()
        if n == 0:
            continue
        bits = flat.view(_INT_VIEW[flat.element_size()])
        if flat.element_size() == 1:
            bits = bits.to(torch.int16)
        main = n - n % _BLOCK
        sums = bits[:main].view(-1, _BLOCK).sum(1, dtype=torch.int64) if main else bits.new_zeros(0, dtype=torch.int64)
        if main < n:
            sums = torch.cat([sums, bits[main:].sum(dtype=torch.int64).reshape(1)])
        w = torch.arange(1 + i, 1 + i + sums.numel(), device=sums.device, dtype=torch.int64)
        total += torch.stack([(sums * w).sum(), sums.sum()]).cpu()
    return total


def _gather_fingerprints(model_or_params: ParamsLike, group: Optional[dist.ProcessGroup]) -> list[torch.Tensor]:
    _require_dist()
    fp = param_fingerprint(model_or_params)
    dev = _comm_device(group, torch.device("cpu"))
    out = [torch.empty(2, dtype=torch.int64, device=dev) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, fp.to(dev), group=group)
    return [t.cpu() for t in out]


def params_identical(model_or_params: ParamsLike, group: Optional[dist.ProcessGroup] = None) -> bool:
    """True on every rank iff all ranks of ``group`` hold the same parameters (a collective:
    every rank must call it)."""
    fps = _gather_fingerprints(model_or_params, group)
    return all(torch.equal(fps[0], f) for f in fps[1:])


def assert_identical(model_or_params: ParamsLike, group: Optional[dist.ProcessGroup] = None) -> None:
    """Raise on every rank, naming the ranks that differ from rank 0, unless all hold the same
    parameters (a collective)."""
    fps = _gather_fingerprints(model_or_params, group)
    differ = [r for r, f in enumerate(fps) if not torch.equal(fps[0], f)]
    if differ:
        raise RuntimeError(f"parameters differ between rank 0 and rank(s) {differ} of the group; under DDP every "
                           "rank must start from the same weights (wrap the model in DistributedDataParallel, which "
                           "broadcasts rank 0's, or call nowcast.distributed.broadcast_params(model))")


@torch.no_grad()
def broadcast_params(model_or_params: ParamsLike, src: int = 0, group: Optional[dist.ProcessGroup] = None) -> None:
    """Copy rank ``src``'s parameters to every rank of ``group`` (a collective)."""
    _require_dist()
    for p in _params(model_or_params):
        dev = _comm_device(group, p.device)
        buf = p.detach().to(dev).contiguous()
        dist.broadcast(buf, src=src, group=group)
        if buf is not p:
            p.copy_(buf)


def averaged_closure(closure: Closure, group: Optional[dist.ProcessGroup] = None) -> Closure:
    """``closure`` with its loss averaged over the ranks of ``group`` (an all-reduce per call), so
    that a decision taken on the loss is the same on every rank."""
    def run() -> Any:
        loss = closure()
        t = torch.tensor([_as_float(loss)], dtype=torch.float64, device=_comm_device(group, torch.device("cpu")))
        dist.all_reduce(t, group=group)
        mean = t.cpu()[0] / dist.get_world_size(group)
        return mean.to(loss.dtype) if isinstance(loss, torch.Tensor) and loss.is_floating_point() else mean
    return run


class DistributedNiNo(NiNo):
    """:class:`nowcast.NiNo` for data-parallel training: identical parameters on every rank.

    Build it on every rank, after ``torch.distributed.init_process_group``, with the same
    arguments; the model may be the ``DistributedDataParallel`` wrapper or the module inside.

    Args:
        sync: ``"broadcast"`` (``src`` computes and broadcasts; the other ranks keep no history)
            or ``"everywhere"`` (every rank computes the nowcast). See the module docstring.
        src: the global rank that predicts (``"broadcast"``) and whose parameters win a repair.
        group: the process group (default: the world).
        verify: check that all ranks hold the same parameters at construction (raise if not) and
            after every nowcast (repair from ``src`` with a warning if not). One all-gather of two
            int64 per rank and one read of the parameters each time.
        *args, **kwargs: as for :class:`nowcast.NiNo`.

    ``state["repairs"]`` counts the nowcasts after which ranks differed. Checkpoints: save the
    ``src`` rank's ``state_dict()`` (with ``"broadcast"`` the others hold no history) and load it
    on every rank.
    """

    def __init__(self, model_or_params: Any, base_optimizer: torch.optim.Optimizer, *args: Any,
                 sync: str = "broadcast", src: int = 0, group: Optional[dist.ProcessGroup] = None,
                 verify: bool = True, **kwargs: Any) -> None:
        _require_dist()
        if sync not in ("everywhere", "broadcast"):
            raise ValueError(f"sync must be 'broadcast' (rank src computes and broadcasts) or 'everywhere' (every "
                             f"rank computes the nowcast), got {sync!r}")
        world = dist.get_world_size(group)
        if not isinstance(src, int) or not 0 <= src < dist.get_world_size():
            raise ValueError(f"src must be a global rank in 0..{dist.get_world_size() - 1}, got {src!r}")
        super().__init__(model_or_params, base_optimizer, *args, **kwargs)
        self.sync, self.src, self.group, self.verify = sync, src, group, verify
        self.rank, self.world_size = dist.get_rank(), world
        self._history_here = sync == "everywhere" or self.rank == src
        self.state["repairs"] = 0
        if verify:
            assert_identical(self._params, group)

    def __repr__(self) -> str:
        return f"Distributed{super().__repr__()[:-1]}, sync={self.sync!r}, src={self.src})"

    def _record(self, m: int) -> None:
        if self._history_here:
            super()._record(m)

    def _predict(self, k: int) -> torch.Tensor:
        if self.sync == "everywhere":
            return super()._predict(k)
        # header: [status (0 ok, 1 predict raised, 2 wrong shape), dtype index]
        header = torch.zeros(2, dtype=torch.int64)
        pred: Any = None
        error: Optional[BaseException] = None
        if self.rank == self.src:
            try:
                pred = super()._predict(k)
            except Exception as e:  # told to every rank below, then raised here
                error = e
                header[0] = 1
            else:
                if not isinstance(pred, torch.Tensor) or tuple(pred.shape) != (self.num_params,):
                    header[0] = 2
                else:
                    if pred.dtype not in _DTYPES:
                        pred = pred.float()
                    header[1] = _DTYPES.index(pred.dtype)
        hdev = _comm_device(self.group, torch.device("cpu"))
        header = header.to(hdev)
        dist.broadcast(header, src=self.src, group=self.group)
        status, dtype_index = int(header[0]), int(header[1])
        if status == 1:
            if error is not None:
                raise error
            raise RuntimeError(f"the nowcaster raised on rank {self.src}; see that rank's error")
        if status == 2:
            if self.rank == self.src:
                return pred  # NiNo reports the wrong shape
            raise RuntimeError(f"the nowcaster on rank {self.src} returned a prediction of the wrong shape")
        if self.rank == self.src:
            buf = pred.to(_comm_device(self.group, pred.device)).contiguous()
        else:
            dev = _comm_device(self.group, self.nowcast_device)
            buf = torch.empty(self.num_params, dtype=_DTYPES[dtype_index], device=dev)
        dist.broadcast(buf, src=self.src, group=self.group)
        return buf

    def _nowcast(self, closure: Optional[Closure]) -> Any:
        loss = super()._nowcast(averaged_closure(closure, self.group) if closure is not None else None)
        if self.verify and not params_identical(self._params, self.group):
            self.state["repairs"] += 1
            broadcast_params(self._params, src=self.src, group=self.group)
            warnings.warn(f"DistributedNiNo: ranks held different parameters after the nowcast at step "
                          f"{self.state['step']}; rank {self.src}'s were copied to all (repair "
                          f"{self.state['repairs']}). The nowcaster is not deterministic across ranks here: "
                          "pass sync='broadcast' to compute it once", RanksDivergedWarning, stacklevel=4)
        return loss

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        out = super().state_dict()
        out["nino"]["repairs"] = int(self.state["repairs"])
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        super().load_state_dict(state_dict)
        self.state["repairs"] = int(state_dict["nino"].get("repairs", 0))
        if not self._history_here:
            self.state["history"] = []

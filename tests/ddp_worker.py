"""Worker processes for tests/test_distributed.py: DDP training with DistributedNiNo (gloo, CPU).

Every rank trains the same small MLP on its half of a global batch of ``GLOBAL_BATCH`` rows for
``STEPS`` steps with AdamW wrapped in DistributedNiNo (period 10, ctx 5: nowcasts at steps 9 and
19) and the nowcaster shipped in the package. After every nowcast it saves its flat parameters.
:func:`single_process` runs the same training in one process on the whole global batch.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

STEPS, PERIOD, CTX, GLOBAL_BATCH = 20, 10, 5, 16
SHIPPED = Path(__file__).resolve().parents[1] / "nowcast" / "checkpoints" / "nino_ours.safetensors"


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3))


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g)
    return x, torch.sin(2 * x[:, :3]) + 0.05 * torch.randn(GLOBAL_BATCH, 3, generator=g)


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def nowcaster():
    import nowcast

    return nowcast.load(SHIPPED)


def train(model: torch.nn.Module, opt, forward: torch.nn.Module, rank: int,
          world: int) -> tuple[list[torch.Tensor], int]:
    """Train STEPS steps; return the flat parameters after each nowcast and the most history
    states held at once."""
    after: list[torch.Tensor] = []
    held = 0
    share = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = global_batch(step)
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        opt.zero_grad(set_to_none=True)
        if opt.need_grads:
            F.mse_loss(forward(x), y).backward()
        opt.step()
        held = max(held, len(opt.state["history"]))
        last = opt.state["last_nowcast"]
        if last is not None and last["step"] == step:
            assert last["accepted"], last
            after.append(flat(model))
    return after, held


def single_process() -> list[torch.Tensor]:
    """The same run in one process on the whole global batch (plain NiNo)."""
    from nowcast import NiNo

    model = make_model()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, _ = global_batch(0)
    opt = NiNo(model, base, nowcaster(), period=PERIOD, ctx=CTX, total_steps=STEPS, example_inputs=x)
    return train(model, opt, model, 0, 1)[0]


def _exit_now() -> None:
    """End a rank that finished cleanly without running interpreter teardown: at exit, torch's
    gloo/TCPStore threads sometimes hit ``std::terminate`` ("terminate called without an active
    exception", SIGABRT) after all work and ``destroy_process_group`` are done (seen with torch 2.13,
    about one 2-rank run in 8), which would fail the test for a reason outside this package."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank: both sync modes in turn, results saved as ``{sync}_rank{rank}.pt``."""
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from nowcast.distributed import DistributedNiNo

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for sync in ("everywhere", "broadcast"):
            model = make_model()
            ddp = DDP(model)
            base = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
            x, _ = global_batch(0)
            opt = DistributedNiNo(ddp, base, nowcaster(), period=PERIOD, ctx=CTX, total_steps=STEPS,
                                  example_inputs=x, sync=sync)
            after, held = train(model, opt, ddp, rank, world)
            torch.save({"after": after, "nowcasts": opt.state["nowcasts"], "repairs": opt.state["repairs"],
                        "history_held": held},
                       os.path.join(out_dir, f"{sync}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    _exit_now()


class RankSkewed:
    """A nowcaster whose result depends on the rank (as a nondeterministic kernel would): the
    shipped NiNo plus ``1e-4 * rank``."""

    needs_graph = True

    def __init__(self) -> None:
        import torch.distributed as dist

        self.inner, self.rank = nowcaster(), dist.get_rank()

    def predict(self, graph, states, k):
        return self.inner.predict(graph, states, k) + 1e-4 * self.rank


def worker_edge_cases(rank: int, world: int, port: int, out_dir: str) -> None:
    """Repair of diverged ranks, a rank-averaged spike check, and mismatched starting weights."""
    torch.set_num_threads(1)
    import warnings

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from nowcast.distributed import DistributedNiNo, RanksDivergedWarning, params_identical

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    result: dict = {}
    try:
        # 1. a rank-dependent nowcaster: "everywhere" detects it and copies rank 0's parameters;
        #    "broadcast" never runs it on rank 1
        x, _ = global_batch(0)
        for sync in ("everywhere", "broadcast"):
            model = make_model()
            ddp = DDP(model)
            opt = DistributedNiNo(ddp, torch.optim.AdamW(ddp.parameters(), lr=1e-2), RankSkewed(), period=PERIOD,
                                  ctx=CTX, total_steps=STEPS, example_inputs=x, sync=sync)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                after, _ = train(model, opt, ddp, rank, world)
            result[sync] = {"repairs": opt.state["repairs"], "after": after,
                            "diverged_warnings": sum(issubclass(w.category, RanksDivergedWarning) for w in caught),
                            "identical_now": params_identical(model)}

        # 2. spike check on the averaged loss: rank 1's local loss alone would reject, the mean does not
        model = make_model()
        ddp = DDP(model)
        opt = DistributedNiNo(ddp, torch.optim.SGD(ddp.parameters(), lr=1e-2), nowcaster(), period=PERIOD,
                              ctx=CTX, total_steps=STEPS, example_inputs=x, spike_factor=1.5)
        calls: dict[int, int] = {}

        def closure():
            step = opt.state["step"]
            calls[step] = calls.get(step, 0) + 1
            opt.zero_grad()
            xb, yb = global_batch(0)
            loss = F.mse_loss(ddp(xb), yb)
            loss.backward()
            # the nowcast step calls the closure before (1st) and after (2nd) writing the prediction;
            # after it, rank 1 reports twice its loss (alone it would reject: 2 > spike_factor 1.5),
            # rank 0 a quarter: the mean, 1.125 times the loss, passes
            if step == PERIOD - 1 and calls[step] == 2:
                loss = loss * (2.0 if rank == 1 else 0.25)
            return loss

        for _ in range(PERIOD):
            opt.step(closure)
        result["spike_accepted"] = opt.state["last_nowcast"]["accepted"]
        result["spike_identical"] = params_identical(model)

        # 3. the nowcaster raises on rank 0 (broadcast mode): every rank gets NowcastError with nothing
        #    changed, and the retry succeeds on every rank
        from nowcast.optim import NowcastError

        class FailsOnce:
            needs_graph = False

            def __init__(self) -> None:
                self.calls = 0

            def predict(self, graph, states, k):
                self.calls += 1
                if self.calls == 1:
                    raise RuntimeError("out of memory (simulated)")
                return states[:, -1] + 0.01

        model = make_model()
        ddp = DDP(model)
        opt = DistributedNiNo(ddp, torch.optim.SGD(ddp.parameters(), lr=1e-2), FailsOnce(), period=PERIOD, ctx=CTX,
                              k_schedule=1)
        for step in range(PERIOD - 1):
            opt.zero_grad()
            xb, yb = global_batch(step)
            F.mse_loss(ddp(xb), yb).backward()
            opt.step()
        before = flat(model)
        try:
            opt.step()
            result["error"] = None
        except NowcastError as e:
            result["error"] = str(e)
        result["unchanged"] = torch.equal(before, flat(model)) and opt.state["step"] == PERIOD - 1
        opt.step()  # the retry
        result["retried"] = opt.state["nowcasts"] == 1 and torch.allclose(flat(model), before + 0.01)
        result["retry_identical"] = params_identical(model)

        # 4. different starting weights on the ranks (no DDP): refused at construction, naming the fix
        torch.manual_seed(rank)
        lone = torch.nn.Linear(3, 2)
        try:
            DistributedNiNo(lone, torch.optim.SGD(lone.parameters(), lr=0.1), None)
            result["mismatch_error"] = None
        except RuntimeError as e:
            result["mismatch_error"] = str(e)
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"edge_rank{rank}.pt"))
    _exit_now()


def worker_fsdp(rank: int, world: int, port: int, out_dir: str) -> None:
    """FSDP2 (fully_shard per Linear and at the root) with ShardedNiNo and the shipped nowcaster."""
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import neugraph
    from nowcast.fsdp import ShardedNiNo

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = make_model()
        x, _ = global_batch(0)
        graph = neugraph.compile(model, x, profile="nino")  # before sharding
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = ShardedNiNo(model, torch.optim.AdamW(model.parameters(), lr=1e-2), nowcaster(), period=PERIOD,
                          ctx=CTX, total_steps=STEPS, graph=graph)
        after, held = [], 0
        share = GLOBAL_BATCH // world
        for step in range(STEPS):
            xb, yb = global_batch(step)
            xb, yb = xb[rank * share:(rank + 1) * share], yb[rank * share:(rank + 1) * share]
            opt.zero_grad(set_to_none=True)
            if opt.need_grads:
                F.mse_loss(model(xb), yb).backward()
            opt.step()
            held = max(held, sum(h.numel() for h in opt.state["history"]))
            last = opt.state["last_nowcast"]
            if last is not None and last["step"] == step:
                assert last["accepted"], last
                after.append(torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()]))
        torch.save({"after": after, "nowcasts": opt.state["nowcasts"], "history_elements": held,
                    "num_tracked_local": opt.num_tracked, "plan": opt.memory_plan()},
                   os.path.join(out_dir, f"fsdp_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    _exit_now()

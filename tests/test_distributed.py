"""NiNo under DDP: 2 CPU ranks (gloo, spawned processes) through two nowcasts."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ddp_worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available in this torch build")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Run the 2-rank job once; load what every rank saved."""
    if not ddp_worker.SHIPPED.is_file():
        pytest.skip(f"the shipped nowcaster {ddp_worker.SHIPPED} is missing")
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(ddp_worker.worker, args=(2, free_port(), str(out)), nprocs=2, start_method="spawn",
                       join=True)
    return {(sync, r): torch.load(out / f"{sync}_rank{r}.pt") for sync in ("everywhere", "broadcast")
            for r in (0, 1)}


@pytest.fixture(scope="module")
def single():
    torch.set_num_threads(1)
    return ddp_worker.single_process()


@pytest.mark.parametrize("sync", ["everywhere", "broadcast"])
def test_ranks_bitwise_identical_after_each_nowcast(ddp_runs, sync):
    r0, r1 = ddp_runs[(sync, 0)], ddp_runs[(sync, 1)]
    assert r0["nowcasts"] == r1["nowcasts"] == 2 and len(r0["after"]) == len(r1["after"]) == 2
    for a, b in zip(r0["after"], r1["after"]):
        assert torch.equal(a, b)  # bitwise
    assert r0["repairs"] == r1["repairs"] == 0  # no rank ever needed src's parameters


def test_broadcast_keeps_history_on_rank_0_only(ddp_runs):
    assert ddp_runs[("broadcast", 0)]["history_held"] == ddp_worker.CTX - 1
    assert ddp_runs[("broadcast", 1)]["history_held"] == 0
    assert ddp_runs[("everywhere", 1)]["history_held"] == ddp_worker.CTX - 1


@pytest.mark.parametrize("sync", ["everywhere", "broadcast"])
def test_matches_single_process_with_the_same_global_batch(ddp_runs, single, sync):
    assert len(single) == 2
    start = torch.cat([p.detach().reshape(-1) for p in ddp_worker.make_model().parameters()])
    for j, (d, s) in enumerate(zip(ddp_runs[(sync, 0)]["after"], single)):
        err = (d - s).abs().max().item()
        assert err <= 1e-6, f"nowcast {j}: max abs difference {err:.3g} from the single-process run"
        assert (s - start).abs().max() > 1e-3  # the runs trained: the comparison is not of untouched weights
    # the two modes compute the same nowcast
    for a, b in zip(ddp_runs[("everywhere", 0)]["after"], ddp_runs[("broadcast", 0)]["after"]):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def edge_runs(tmp_path_factory):
    if not ddp_worker.SHIPPED.is_file():
        pytest.skip(f"the shipped nowcaster {ddp_worker.SHIPPED} is missing")
    out = tmp_path_factory.mktemp("ddp_edge")
    mp.start_processes(ddp_worker.worker_edge_cases, args=(2, free_port(), str(out)), nprocs=2,
                       start_method="spawn", join=True)
    return [torch.load(out / f"edge_rank{r}.pt") for r in (0, 1)]


@pytest.mark.parametrize("sync,repairs", [("everywhere", 2), ("broadcast", 0)])
def test_rank_dependent_nowcaster_is_detected_and_repaired(edge_runs, sync, repairs):
    r0, r1 = edge_runs[0][sync], edge_runs[1][sync]
    assert r0["repairs"] == r1["repairs"] == repairs
    assert r0["diverged_warnings"] == r1["diverged_warnings"] == repairs
    assert len(r0["after"]) == 2
    for a, b in zip(r0["after"], r1["after"]):
        assert torch.equal(a, b)
    assert r0["identical_now"] and r1["identical_now"]


def test_spike_check_uses_the_loss_averaged_over_ranks(edge_runs):
    assert [r["spike_accepted"] for r in edge_runs] == [True, True]
    assert all(r["spike_identical"] for r in edge_runs)


def test_a_failing_nowcaster_fails_every_rank_alike(edge_runs):
    r0, r1 = edge_runs
    assert "out of memory (simulated)" in r0["error"]
    assert r1["error"] is not None and "raised on rank 0" in r1["error"]
    for r in edge_runs:
        assert r["unchanged"] and r["retried"] and r["retry_identical"]


def test_different_starting_weights_are_refused(edge_runs):
    for r in edge_runs:
        assert r["mismatch_error"] is not None and "rank(s) [1]" in r["mismatch_error"]
        assert "broadcast_params" in r["mismatch_error"]


def test_needs_an_initialized_process_group():
    from nowcast.distributed import DistributedNiNo

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    m = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedNiNo(m, torch.optim.SGD(m.parameters(), lr=0.1), None)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    pytest.importorskip("torch.distributed.fsdp", reason="this torch build has no FSDP")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch build has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    if not ddp_worker.SHIPPED.is_file():
        pytest.skip(f"the shipped nowcaster {ddp_worker.SHIPPED} is missing")
    out = tmp_path_factory.mktemp("fsdp")
    mp.start_processes(ddp_worker.worker_fsdp, args=(2, free_port(), str(out)), nprocs=2, start_method="spawn",
                       join=True)
    return [torch.load(out / f"fsdp_rank{r}.pt") for r in (0, 1)]


def test_fsdp_sharded_history_and_single_process_match(fsdp_runs, single):
    r0, r1 = fsdp_runs
    total = sum(p.numel() for p in ddp_worker.make_model().parameters())
    assert r0["nowcasts"] == r1["nowcasts"] == 2
    # the history is sharded: each rank holds (ctx - 1) states of its own shard only
    assert r0["num_tracked_local"] + r1["num_tracked_local"] == total
    assert max(r0["num_tracked_local"], r1["num_tracked_local"]) < total * 0.6
    for r in fsdp_runs:
        assert r["history_elements"] == (ddp_worker.CTX - 1) * r["num_tracked_local"]
    assert r0["plan"]["states_bytes"] == total * ddp_worker.CTX * 4 and r1["plan"]["states_bytes"] == 0
    for j, (a, b, s) in enumerate(zip(r0["after"], r1["after"], single)):
        assert torch.equal(a, b)
        err = (a - s).abs().max().item()
        assert err <= 1e-6, f"nowcast {j}: FSDP differs from the single-process run by {err:.3g}"

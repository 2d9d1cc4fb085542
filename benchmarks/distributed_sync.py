"""DistributedNiNo: compute the nowcast on every rank, or on rank 0 and broadcast? (CPU, gloo)

    python benchmarks/distributed_sync.py                       # all cases, 2 ranks
    python benchmarks/distributed_sync.py --cases fm16-nino --world 2

Each case trains a model with AdamW for ``nowcasts * 10`` steps (period 10, ctx 5), once per
mode, each in fresh processes: under DDP with DistributedNiNo(sync="everywhere" / "broadcast"),
and under FSDP2 (fully_shard per layer) with ShardedNiNo ("fsdp"). It times every nowcast step on every rank
between two barriers (so the figure is the step's wall time for the slowest rank; it includes the
``verify`` check). It also times the fingerprint check alone and one broadcast of ``num_params``
float32 values, and reports the history each rank holds and its peak
RSS. Results: ``benchmarks/results/distributed_sync.json`` (machine, load, versions included).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHIPPED = ROOT / "nowcast" / "checkpoints" / "nino_ours.safetensors"
PERIOD, CTX = 10, 5

# name: (model, nowcaster, nowcasts)
CASES = {
    "fm16-nino": ("fm16", "nino", 3),
    "mlp270k-nino": ("mlp:256", "nino", 2),
    "mlp1m-linefit+": ("mlp:700", "linefit+", 3),
    "mlp10m-linefit+": ("mlp:2600", "linefit+", 3),
}


def build(spec: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(model, example inputs, targets) with seed 0; ``mlp:W`` is 784 -> W -> W -> 10."""
    torch.manual_seed(0)
    if spec == "fm16":
        from nowcast.tasks import build_model, example_inputs, get_task

        task = get_task("fm16")
        model = build_model(task, 0)
        x = example_inputs(task)
        x = x[0] if isinstance(x, tuple) else x
        x = x.expand(8, *x.shape[1:]).clone()
        return model, x, torch.randn(8, 10)
    width = int(spec.split(":")[1])
    model = torch.nn.Sequential(torch.nn.Linear(784, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                torch.nn.ReLU(), torch.nn.Linear(width, 10))
    return model, torch.randn(8, 784), torch.randn(8, 10)


def make_nowcaster(name: str):
    import nowcast

    return nowcast.load(SHIPPED) if name == "nino" else nowcast.LinefitPlus()


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(rank: int, world: int, port: int, case: str, sync: str, out_dir: str) -> None:
    """One configuration in fresh processes, so that peak RSS belongs to it alone."""
    torch.set_num_threads(1)
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from nowcast.distributed import DistributedNiNo, params_identical

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    spec, ncname, nowcasts = CASES[case]
    model, x, y = build(spec)
    nc = make_nowcaster(ncname)
    common = dict(period=PERIOD, ctx=CTX, total_steps=PERIOD * nowcasts)
    if sync == "fsdp":
        import neugraph
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from nowcast.fsdp import ShardedNiNo

        graph = neugraph.compile(model, x, profile="nino") if nc.needs_graph else None
        mesh = init_device_mesh("cpu", (world,))
        for sub in model.modules():
            if sub is not model and any(True for _ in sub.parameters(recurse=False)):
                fully_shard(sub, mesh=mesh)
        fully_shard(model, mesh=mesh)
        forward = model
        opt = ShardedNiNo(model, torch.optim.AdamW(model.parameters(), lr=1e-3), nc, graph=graph, **common)
    else:
        forward = DDP(model)
        opt = DistributedNiNo(forward, torch.optim.AdamW(forward.parameters(), lr=1e-3), nc,
                              example_inputs=x if nc.needs_graph else None, sync=sync, **common)
    rss_start = _rss_mib()
    times, history_bytes = [], 0
    for _ in range(PERIOD * nowcasts):
        opt.zero_grad()
        if opt.need_grads:
            F.mse_loss(forward(x), y).backward()
            opt.step()
        else:
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            dist.barrier()
            times.append(time.perf_counter() - t0)
        history_bytes = max(history_bytes, sum(h.numel() * h.element_size() for h in opt.state["history"]))
    row = {"case": case, "sync": sync, "rank": rank, "num_params": opt.num_params, "nowcaster": type(nc).__name__,
           "nowcast_step_s": times, "history_bytes": history_bytes, "rss_start_mib": rss_start,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "nowcasts": opt.state["nowcasts"], "repairs": opt.state.get("repairs", 0)}
    if sync != "fsdp":
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(5):
            params_identical(model)
        row["verify_s"] = (time.perf_counter() - t0) / 5
        buf = torch.zeros(opt.num_params)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(3):
            dist.broadcast(buf, src=0)
        dist.barrier()
        row["broadcast_s"] = (time.perf_counter() - t0) / 3
    else:
        row["plan"] = opt.memory_plan()
    dist.destroy_process_group()
    Path(out_dir, f"{case}_{sync}_rank{rank}.json").write_text(json.dumps(row))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {list(CASES)}")
    ap.add_argument("--modes", default="everywhere,broadcast,fsdp",
                    help="DistributedNiNo sync modes under DDP, and fsdp (ShardedNiNo under FSDP2)")
    ap.add_argument("--world", type=int, default=2, help="number of ranks (processes)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed_sync.json"))
    args = ap.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    import torch.multiprocessing as mp

    modes = [m for m in args.modes.split(",") if m]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            for sync in modes:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", 0))
                    port = sock.getsockname()[1]
                mp.start_processes(worker, args=(args.world, port, case, sync, tmp), nprocs=args.world,
                                   start_method="spawn")
                rows += [json.loads(Path(tmp, f"{case}_{sync}_rank{k}.json").read_text()) for k in range(args.world)]
    summary = []
    for case in cases:
        for sync in modes:
            mine = [r for r in rows if r["case"] == case and r["sync"] == sync]
            med = statistics.median(max(ts) for ts in zip(*(r["nowcast_step_s"] for r in mine)))
            summary.append({"case": case, "sync": sync, "num_params": mine[0]["num_params"],
                            "nowcaster": mine[0]["nowcaster"], "median_nowcast_step_s": round(med, 4),
                            "verify_s": round(max(r.get("verify_s", 0.0) for r in mine), 5),
                            "broadcast_s": round(max(r.get("broadcast_s", 0.0) for r in mine), 5),
                            "history_mib_per_rank": [round(r["history_bytes"] / 2**20, 2) for r in mine],
                            "peak_rss_mib_per_rank": [round(r["peak_rss_mib"]) for r in mine],
                            "rss_at_start_mib_per_rank": [round(r["rss_start_mib"]) for r in mine],
                            "repairs": max(r["repairs"] for r in mine)})
    out = {"command": "python benchmarks/distributed_sync.py " + " ".join(sys.argv[1:]),
           "world": args.world, "backend": "gloo", "threads_per_rank": 1, "period": PERIOD, "ctx": CTX,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                       "torch": torch.__version__, "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
           "wall_s": round(time.perf_counter() - t0, 1), "summary": summary, "per_rank": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    w = max(len(c) for c in cases)
    print(f"{'case':<{w}}  {'mode':<10}  {'params':>10}  {'nowcast step':>12}  {'verify':>8}  {'bcast':>8}  "
          "history MiB/rank  peak RSS MiB/rank (at start)")
    for r in summary:
        print(f"{r['case']:<{w}}  {r['sync']:<10}  {r['num_params']:>10,}  {r['median_nowcast_step_s']:>10.3f} s"
              f"  {r['verify_s'] * 1e3:>6.1f}ms  {r['broadcast_s'] * 1e3:>6.1f}ms  {r['history_mib_per_rank']}  "
              f"{r['peak_rss_mib_per_rank']} ({r['rss_at_start_mib_per_rank']})")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

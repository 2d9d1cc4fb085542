"""DistributedNiNo: compute the nowcast on every rank, or on rank 0 and broadcast? (CPU, gloo)

    python benchmarks/distributed_sync.py                       # all cases, 2 ranks
    python benchmarks/distributed_sync.py --cases fm16-nino --world 2

Each case trains a model under DDP with AdamW wrapped in DistributedNiNo (period 10, ctx 5) for
``nowcasts * 10`` steps, once per ``sync`` mode, and times every nowcast step on every rank
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


def worker(rank: int, world: int, port: int, cases: list[str], out_dir: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from nowcast.distributed import DistributedNiNo, params_identical

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = []
    for case in cases:
        spec, ncname, nowcasts = CASES[case]
        for sync in ("everywhere", "broadcast"):
            model, x, y = build(spec)
            ddp = DDP(model)
            nc = make_nowcaster(ncname)
            opt = DistributedNiNo(ddp, torch.optim.AdamW(ddp.parameters(), lr=1e-3), nc, period=PERIOD, ctx=CTX,
                                  total_steps=PERIOD * nowcasts, example_inputs=x if nc.needs_graph else None,
                                  sync=sync)
            times, history_bytes = [], 0
            for _ in range(PERIOD * nowcasts):
                opt.zero_grad()
                if opt.need_grads:
                    F.mse_loss(ddp(x), y).backward()
                    opt.step()
                else:
                    dist.barrier()
                    t0 = time.perf_counter()
                    opt.step()
                    dist.barrier()
                    times.append(time.perf_counter() - t0)
                history_bytes = max(history_bytes, sum(h.numel() * h.element_size() for h in opt.state["history"]))
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(5):
                params_identical(model)
            verify_s = (time.perf_counter() - t0) / 5
            buf = torch.zeros(opt.num_params)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(3):
                dist.broadcast(buf, src=0)
            dist.barrier()
            broadcast_s = (time.perf_counter() - t0) / 3
            rows.append({"case": case, "sync": sync, "rank": rank, "num_params": opt.num_params,
                         "nowcaster": type(nc).__name__, "nowcast_step_s": times,
                         "verify_s": verify_s, "broadcast_s": broadcast_s, "history_bytes": history_bytes,
                         "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                         "nowcasts": opt.state["nowcasts"], "repairs": opt.state["repairs"]})
            del opt, ddp, model, nc
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {list(CASES)}")
    ap.add_argument("--world", type=int, default=2, help="number of ranks (processes)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed_sync.json"))
    args = ap.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(args.world, port, cases, tmp), nprocs=args.world, start_method="spawn")
        rows = [r for k in range(args.world) for r in json.loads(Path(tmp, f"rank{k}.json").read_text())]
    summary = []
    for case in cases:
        for sync in ("everywhere", "broadcast"):
            mine = [r for r in rows if r["case"] == case and r["sync"] == sync]
            med = statistics.median(max(ts) for ts in zip(*(r["nowcast_step_s"] for r in mine)))
            summary.append({"case": case, "sync": sync, "num_params": mine[0]["num_params"],
                            "nowcaster": mine[0]["nowcaster"], "median_nowcast_step_s": round(med, 4),
                            "verify_s": round(max(r["verify_s"] for r in mine), 5),
                            "broadcast_s": round(max(r["broadcast_s"] for r in mine), 5),
                            "history_mib_per_rank": [round(r["history_bytes"] / 2**20, 2) for r in mine],
                            "peak_rss_mib_per_rank": [round(r["peak_rss_mib"]) for r in mine],
                            "repairs": max(r["repairs"] for r in mine)})
    out = {"command": "python benchmarks/distributed_sync.py " + " ".join(sys.argv[1:]),
           "world": args.world, "backend": "gloo", "threads_per_rank": 1, "period": PERIOD, "ctx": CTX,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                       "torch": torch.__version__, "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
           "wall_s": round(time.perf_counter() - t0, 1), "summary": summary, "per_rank": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    w = max(len(c) for c in cases)
    print(f"{'case':<{w}}  {'sync':<10}  {'params':>10}  {'nowcast step':>12}  {'verify':>8}  {'bcast':>8}  "
          "history MiB/rank")
    for r in summary:
        print(f"{r['case']:<{w}}  {r['sync']:<10}  {r['num_params']:>10,}  {r['median_nowcast_step_s']:>10.3f} s"
              f"  {r['verify_s'] * 1e3:>6.1f}ms  {r['broadcast_s'] * 1e3:>6.1f}ms  {r['history_mib_per_rank']}")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

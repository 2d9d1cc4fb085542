#!/usr/bin/env python
"""Nowcast cost: time and peak memory of one NiNo nowcast against model size, per path (CPU).

Models are GPT-2 style (``transformers.GPT2LMHeadModel`` from a config: no download, tied head,
``n_embd``/``n_layer`` growing with the target size and the vocabulary sized to land on it), from
about 1e4 to 1e8 parameters. Each size runs in a fresh Python process (``--worker``), one thread
(torch, and the BLAS of numpy/scipy through ``OMP/OPENBLAS/MKL_NUM_THREADS=1``):

1. build the model (seed 0) and compile its ``nino`` graph (LPE 8): wall time and peak memory;
2. states: (params, 5) float32, a random walk (step 1e-3) ending at the model's parameters;
3. the nowcaster: the published ``nino_no_posw.pt`` when ``../shared/reference`` has it, else
   ``NiNoGNN()`` with seed 0 (same size and cost; the JSON says which);
4. per path, one nowcast at horizon 10: ``stream`` (``nowcast.stream``, float32), ``materialised``
   (``NiNoGNN.predict``; skipped with the reason when its memory estimate is above
   ``--mat-limit-gb``), ``stream_bf16`` (up to ``--bf16-max`` parameters: this CPU has no bfloat16
   arithmetic, so torch emulates it and it is slower than float32 here). Wall seconds, CPU seconds
   (``time.process_time``; the machine is shared, CPU time is the steadier figure), the peak
   resident memory the nowcast added (``VmHWM`` after resetting it through /proc/self/clear_refs,
   minus ``VmRSS`` before) and the process's peak so far;
   The process peak is the high-water mark during the nowcast (model, states, result and the
   Python runtime included); the compile's own peak is reported beside its time.
5. agreement: max abs difference streamed - materialised; bf16 - float32 (max, mean, and the max
   relative to the largest predicted change ``|pred - newest|``); with ``--subgraphs`` also the
   per-block subgraph mode (``subgraphs="auto"``): time, memory and its difference from the
   whole-graph prediction;
6. one AdamW training step of the model (batch 4 x 128 tokens, median of 3 after one warm-up):
   the nowcast's overhead as a share of 1000 training steps.

Memory budget of the issue: whole-process peak (before the training step) <= (ctx + 3) x params
x 4 bytes + 2 GiB.

``--real`` adds bf16 and streamed-vs-materialised errors on real trajectories: the two conformance
fixtures (the authors' FM/16 and GPT-2 toy states, published nowcaster) and an ``austen-3-64``
run (GPT-2 3 x 64 on Jane Austen, AdamW at the task's settings, a state every 40 steps).

Usage::

    python benchmarks/nowcast_cost.py --sizes 1e4,1e5,1e6,1e7 --real   # minutes
    python benchmarks/nowcast_cost.py --sizes 1e8                      # the 100M model alone
    python benchmarks/nowcast_cost.py --table                          # rewrite .md/.png from the JSON

Results merge into ``benchmarks/results/nowcast_cost.json`` (one entry per size, each with the
command that made it), ``nowcast_cost.md`` (table) and ``nowcast_cost.png``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_OUT = RESULTS / "nowcast_cost.json"
REFERENCE = ROOT.parent / "shared" / "reference"
CKPT = REFERENCE / "checkpoints" / "nino_no_posw.pt"
CTX, HIDDEN, HORIZON = 5, 128, 10
# (n_embd, n_layer, n_head, n_positions) per target size; the vocabulary fills the rest
SHAPES = {1e4: (16, 2, 2, 32), 1e5: (48, 3, 4, 64), 1e6: (128, 4, 4, 128), 1e7: (320, 6, 5, 256),
          3e7: (512, 8, 8, 512), 1e8: (768, 12, 12, 1024)}
# materialised path, bytes per edge at its peak: measured 3.0-3.2 KB at 1e5-1e6 edges (several
# (edges x hidden) float32 tensors: edge states, FiLM output, gathered node projections, messages,
# head input; features and indices); the estimate adds a third
MAT_BYTES_PER_EDGE = 8 * HIDDEN * 4 + 256


# ---- measurement helpers (worker side) ------------------------------------------------------------
def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _settle() -> None:
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure(fn):
    """Run ``fn`` once: (result, wall s, CPU s, peak added bytes, process peak bytes)."""
    _settle()
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
        resettable = True
    except OSError:
        resettable = False
    base = _kib("VmRSS")
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    hwm = _kib("VmHWM")
    added = (hwm - base) * 1024 if resettable else None
    return out, wall, cpu, added, hwm * 1024


def gpt2_config(target: float) -> dict:
    import torch
    import transformers

    n_embd, n_layer, n_head, n_pos = SHAPES[target]
    base = dict(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_pos, resid_pdrop=0.0,
                embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)
    with torch.device("meta"):
        fixed = sum(p.numel() for p in transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=1, **base))
                    .parameters()) - n_embd
    vocab = max(64, round((target - fixed) / n_embd))
    return dict(base, vocab_size=vocab)


def random_walk_states(flat, ctx: int = CTX, step: float = 1e-3, seed: int = 0):
    """(P, ctx) float32 ending at ``flat``: each earlier state one N(0, step^2) step back."""
    import torch

    g = torch.Generator().manual_seed(seed)
    P = flat.numel()
    states = torch.empty(P, ctx)
    states[:, -1] = flat
    block = 1 << 22
    for t in range(ctx - 2, -1, -1):
        for a in range(0, P, block):
            b = min(P, a + block)
            states[a:b, t] = states[a:b, t + 1] + step * torch.randn(b - a, generator=g)
    return states


def nowcaster():
    import torch

    import nowcast

    if CKPT.exists():
        return nowcast.load(CKPT), f"published {CKPT.name}"
    torch.manual_seed(0)
    return nowcast.NiNoGNN().eval(), "NiNoGNN() seed 0 (published checkpoint not found)"


def errors(a, b, newest=None) -> dict:
    d = (a - b).abs()
    out = {"max_abs": d.max().item(), "mean_abs": d.mean().item()}
    if newest is not None:
        change = (b - newest).abs().max().item()
        out["max_rel_to_max_change"] = out["max_abs"] / change if change > 0 else None
    return out


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    import logging

    import transformers

    import neugraph
    from nowcast.scatter import get_backend
    from nowcast.stream import DEFAULT_CHUNK, stream_predict

    logging.getLogger("transformers").setLevel(logging.ERROR)
    target = spec["target"]
    cfg = gpt2_config(target)
    res: dict = {"target": target, "config": cfg, "chunk": spec.get("chunk") or DEFAULT_CHUNK}
    torch.manual_seed(0)
    model, res["build_s"], _, _, _ = measure(lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)))
    ids = torch.randint(0, cfg["vocab_size"], (1, 8))
    graph, wall, cpu, added, _ = measure(lambda: neugraph.compile(model, ids, profile="nino"))
    res["compile"] = {"wall_s": wall, "cpu_s": cpu, "peak_added_bytes": added}
    P, E = graph.num_params, graph.num_edges
    res.update(params=P, edges=E, nodes=graph.num_nodes)
    states = random_walk_states(graph.flat_params(model))
    nc, res["nowcaster"] = nowcaster()
    res["budget_bytes"] = (CTX + 3) * P * 4 + (2 << 30)
    res["rss_before_nowcast_bytes"] = _kib("VmRSS") * 1024
    chunk = res["chunk"]
    newest = states[:, -1]

    pred, wall, cpu, added, peak = measure(lambda: stream_predict(nc, graph, states, HORIZON, chunk=chunk))
    res["stream"] = {"wall_s": wall, "cpu_s": cpu, "peak_added_bytes": added, "process_peak_bytes": peak,
                     "us_per_edge_cpu": cpu / E * 1e6}
    res["process_peak_bytes"] = peak
    res["within_budget"] = peak <= res["budget_bytes"]

    est = E * MAT_BYTES_PER_EDGE
    if est > spec["mat_limit_gb"] * 2 ** 30:
        res["materialised"] = {"skipped": f"estimated {est / 2 ** 30:.1f} GiB ({MAT_BYTES_PER_EDGE} bytes per "
                                          f"edge) > --mat-limit-gb {spec['mat_limit_gb']}"}
    else:
        mat, wall, cpu, added, peak = measure(lambda: nc.predict(graph, states, HORIZON))
        res["materialised"] = {"wall_s": wall, "cpu_s": cpu, "peak_added_bytes": added, "process_peak_bytes": peak,
                               "us_per_edge_cpu": cpu / E * 1e6, "estimate_bytes": est,
                               "scatter_backend": get_backend()}
        res["stream_vs_materialised"] = errors(pred, mat)
        del mat
        graph._edge_index = None  # give the cached indices back
    if P <= spec["bf16_max"]:
        bf, wall, cpu, added, _ = measure(lambda: stream_predict(nc, graph, states, HORIZON, chunk=chunk,
                                                                 dtype=torch.bfloat16))
        res["stream_bf16"] = {"wall_s": wall, "cpu_s": cpu, "peak_added_bytes": added,
                              "error_vs_fp32": errors(bf, pred, newest)}
        del bf
    else:
        res["stream_bf16"] = {"skipped": f"params > --bf16-max {spec['bf16_max']:.0e} (bf16 is emulated on this CPU)"}
    if spec.get("subgraphs"):
        sub, wall, cpu, added, _ = measure(lambda: stream_predict(nc, graph, states, HORIZON, chunk=chunk,
                                                                  subgraphs="auto"))
        from nowcast.stream import split_blocks

        res["stream_subgraphs"] = {"groups": len(split_blocks(graph)), "wall_s": wall, "cpu_s": cpu,
                                   "peak_added_bytes": added, "difference_vs_whole_graph": errors(sub, pred, newest)}
        del sub
    del pred
    if spec.get("train_step", True):
        res["train_step"] = train_step(model, cfg)
        res["overhead_per_1000_steps"] = res["stream"]["wall_s"] / (1000 * res["train_step"]["wall_s"])
    return res


def train_step(model, cfg: dict, batch: int = 4, context: int = 128) -> dict:
    import torch
    import torch.nn.functional as F

    context = min(context, cfg["n_positions"])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg["vocab_size"], (batch, context + 1), generator=g)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=x[:, :-1]).logits
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        opt.step()

    _, _, _, first_added, _ = measure(step)  # warm-up; allocates the optimizer state
    walls, cpus = [], []
    for _ in range(3):
        _, wall, cpu, _, _ = measure(step)
        walls.append(wall)
        cpus.append(cpu)
    return {"batch": batch, "context": context, "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
            "first_step_peak_added_bytes": first_added}


# ---- real trajectories -------------------------------------------------------------------------
def real_errors() -> dict:
    """bf16 vs float32 and streamed vs materialised on real trajectories (published nowcaster)."""
    import torch

    torch.set_num_threads(1)
    import neugraph
    from nowcast.stream import stream_predict

    sys.path.insert(0, str(ROOT / "tests"))
    out: dict = {}
    nc, which = nowcaster()
    out["nowcaster"] = which
    fixtures = {"fm16": REFERENCE / "fixtures" / "ref_fm16_convnet.pt", "gpt2_toy": REFERENCE / "fixtures" / "ref_gpt2_toy.pt"}
    for name, path in fixtures.items():
        if not path.exists() or not CKPT.exists():
            out[name] = {"skipped": f"{path} or {CKPT} not found"}
            continue
        from nowcast_ref import fm16

        fx = torch.load(path, map_location="cpu", weights_only=True)
        if name == "fm16":
            model, x = fm16(), torch.randn(1, 1, 28, 28)
            model.load_state_dict(fx["state_dict"])
        else:
            import transformers

            model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
                n_embd=6, n_layer=2, n_head=2, vocab_size=5, n_positions=3, bos_token_id=0, eos_token_id=0)).eval()
            model.load_state_dict(fx["state_dict"], strict=False)
            x = torch.randint(0, 5, (1, 3))
        graph = neugraph.compile(model, x, profile="nino")
        graph.node_features = torch.zeros_like(graph.node_features)  # as the fixtures were made
        rows = {}
        for k in (1, 10, 40):
            mat = nc.predict(graph, fx["states"], k)
            s32 = stream_predict(nc, graph, fx["states"], k)
            s16 = stream_predict(nc, graph, fx["states"], k, dtype=torch.bfloat16)
            rows[f"k{k}"] = {"stream_vs_materialised": errors(s32, mat),
                             "stream_vs_published": errors(s32, fx["preds"][f"nino_no_posw_k{k}"]),
                             "bf16_vs_fp32": errors(s16, s32, fx["states"][:, -1])}
        out[name] = {"params": graph.num_params, **rows}
    out["austen-3-64"] = austen_trajectory(nc)
    return out


def austen_trajectory(nc, every: int = 40) -> dict:
    import torch

    import neugraph
    from nowcast import tasks
    from nowcast.stream import stream_predict

    try:
        data = tasks.load_task_data("austen-3-64")
    except Exception as e:  # DataMissingError names the fetch command
        return {"skipped": f"{type(e).__name__}: {e}"}
    task = tasks.get_task("austen-3-64")
    model = tasks.build_model(task, seed=0)
    graph = neugraph.compile(model, tasks.example_inputs(task), profile="nino")
    opt = torch.optim.AdamW(model.parameters(), lr=task.lr, weight_decay=task.weight_decay)
    states = []
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(tasks.batches(task, data, seed=0), 1):
        opt.zero_grad(set_to_none=True)
        tasks.loss_fn(task, model, x, y).backward()
        opt.step()
        if step % every == 0:
            states.append(graph.flat_params(model).clone())
            if len(states) == CTX:
                break
    train_s = time.perf_counter() - t0
    s = torch.stack(states, 1)
    rows = {}
    for k in (1, 10, 40):
        mat = nc.predict(graph, s, k)
        s32 = stream_predict(nc, graph, s, k)
        s16 = stream_predict(nc, graph, s, k, dtype=torch.bfloat16)
        rows[f"k{k}"] = {"stream_vs_materialised": errors(s32, mat), "bf16_vs_fp32": errors(s16, s32, s[:, -1])}
    return {"params": graph.num_params, "steps": every * CTX, "state_every": every, "train_wall_s": train_s, **rows}


# ---- driver --------------------------------------------------------------------------------------
def machine() -> dict:
    import torch

    return {"cpu_count": os.cpu_count(), "cpu_model": _cpu_model(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": 1,
            "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
            "device": "CPU"}


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def worker_env() -> dict:
    """One thread everywhere: torch is set in the worker; numpy/scipy's BLAS (the LPE of
    ``neugraph.compile``) would otherwise start its own threads, which spin on a shared machine."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def run_worker(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = worker_env()
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"target": spec.get("target"), "error": f"worker timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        return {"target": spec.get("target"), "error": p.stderr[-3000:]}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["worker_wall_s"] = time.perf_counter() - t0
    res["loadavg_1min_before_after"] = [load0[0], os.getloadavg()[0]]
    return res


def load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"benchmark": "nowcast_cost", "device": "CPU", "sizes": {}, "real": None}


def gib(b) -> str:
    return "" if b is None else f"{b / 2 ** 30:.2f}"


def mib(b) -> str:
    return "" if b is None else f"{b / 2 ** 20:,.0f}"


def table(doc: dict) -> str:
    head = ("| params | edges | compile wall s (peak added MiB) | stream wall s (CPU s) | stream us/edge (CPU) | "
            "stream peak added MiB | process RSS peak during the nowcast GiB / budget | materialised wall s (CPU s) | "
            "materialised peak added MiB | "
            "max abs stream - mat | bf16 wall s (CPU s) | bf16 max abs err (rel. to max change) | train step s | "
            "nowcast / 1000 steps |")
    lines = ["All figures CPU (2 shared cores, one thread); command per row in the JSON "
             "(`benchmarks/results/nowcast_cost.json`). Budget: (ctx + 3) x params x 4 bytes + 2 GiB.", "", head, "|" + "---|" * (head.count("|") - 1)]
    for key in sorted(doc["sizes"], key=float):
        r = doc["sizes"][key]
        if "error" in r:
            lines.append(f"| ~{float(key):.0e} | error: {r['error'][:80]} |")
            continue
        st, mt, bf = r["stream"], r.get("materialised", {}), r.get("stream_bf16", {})
        mat = ("skipped: " + mt["skipped"]) if "skipped" in mt else f"{mt['wall_s']:.2f} ({mt['cpu_s']:.2f})"
        mat_mem = "" if "skipped" in mt else mib(mt["peak_added_bytes"])
        agree = r.get("stream_vs_materialised", {}).get("max_abs")
        be = bf.get("error_vs_fp32")
        bfs = f"{be['max_abs']:.2e} ({be['max_rel_to_max_change']:.1e})" if be else "skipped"
        bft = f"{bf['wall_s']:.2f} ({bf['cpu_s']:.2f})" if be else "skipped"
        ts = r.get("train_step")
        step_s = "" if ts is None else f"{ts['wall_s']:.2f}"
        share = "" if ts is None else f"{100 * r['overhead_per_1000_steps']:.2f}%"
        lines.append(
            f"| {r['params']:,} | {r['edges']:,} | {r['compile']['wall_s']:.2f} ({mib(r['compile']['peak_added_bytes'])}) "
            f"| {st['wall_s']:.2f} ({st['cpu_s']:.2f}) "
            f"| {st['us_per_edge_cpu']:.2f} | {mib(st['peak_added_bytes'])} | {gib(r['process_peak_bytes'])} / "
            f"{gib(r['budget_bytes'])} | {mat} | {mat_mem} | {'' if agree is None else format(agree, '.1e')} | {bft} | {bfs} | "
            f"{step_s} | {share} |")
    subs = [(r["params"], r["stream"], r["stream_subgraphs"]) for r in doc["sizes"].values() if "stream_subgraphs" in r]
    if subs:
        lines += ["", "Per-block subgraph mode (`subgraphs=\"auto\"`: one group per transformer block, embeddings and "
                  "final norm together), against the whole-graph streamed pass:", "",
                  "| params | groups | wall s (CPU s) | peak added MiB (whole graph) | max abs difference "
                  "(rel. to max change) |", "|---|---|---|---|---|"]
        for p, st, sg in sorted(subs, key=lambda x: x[0]):
            d = sg["difference_vs_whole_graph"]
            lines.append(f"| {p:,} | {sg['groups']} | {sg['wall_s']:.2f} ({sg['cpu_s']:.2f}) | "
                         f"{mib(sg['peak_added_bytes'])} ({mib(st['peak_added_bytes'])}) | {d['max_abs']:.2e} "
                         f"({d['max_rel_to_max_change']:.2f}) |")
    real = doc.get("real")
    if real:
        lines += ["", f"Real trajectories (nowcaster: {real.get('nowcaster')}); max abs error over all parameters:", "",
                  "| trajectory | params | k | streamed - materialised | streamed - published | bf16 - fp32 (max / mean) "
                  "| bf16 max / max change |", "|---|---|---|---|---|---|---|"]
        for name in ("fm16", "gpt2_toy", "austen-3-64"):
            r = real.get(name) or {}
            if "skipped" in r:
                lines.append(f"| {name} | skipped: {r['skipped']} |")
                continue
            for k in ("k1", "k10", "k40"):
                if k not in r:
                    continue
                row = r[k]
                pub = row.get("stream_vs_published", {}).get("max_abs")
                b = row["bf16_vs_fp32"]
                lines.append(f"| {name} | {r['params']:,} | {k[1:]} | {row['stream_vs_materialised']['max_abs']:.1e} | "
                             f"{'' if pub is None else format(pub, '.1e')} | {b['max_abs']:.1e} / {b['mean_abs']:.1e} | "
                             f"{b['max_rel_to_max_change']:.1e} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in doc["sizes"].values() if "error" not in r]
    rows.sort(key=lambda r: r["params"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, key in (("streamed", "stream"), ("materialised", "materialised")):
        pts = [(r["params"], r[key]) for r in rows if key in r and "skipped" not in r[key]]
        if not pts:
            continue
        a.loglog([p for p, _ in pts], [m["cpu_s"] for _, m in pts], "o-", label=f"{name} (CPU s)")
        b.loglog([p for p, _ in pts], [max(m["peak_added_bytes"], 1) / 2 ** 20 for _, m in pts], "o-", label=name)
    pts = [(r["params"], r["train_step"]["cpu_s"] * 1000) for r in rows if r.get("train_step")]
    if pts:
        a.loglog([p for p, _ in pts], [t for _, t in pts], "k--", label="1000 AdamW steps (CPU s)")
    b.loglog([r["params"] for r in rows], [r["params"] * CTX * 4 / 2 ** 20 for r in rows], "k:", label="the 5 states")
    a.set(xlabel="parameters (GPT-2 style)", ylabel="seconds", title="one nowcast, CPU, 1 thread")
    b.set(xlabel="parameters (GPT-2 style)", ylabel="MiB", title="peak memory added by the nowcast")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e4,1e5,1e6,1e7", help=f"comma-separated targets among {sorted(SHAPES)}")
    ap.add_argument("--mat-limit-gb", type=float, default=8.0, help="skip the materialised path above this estimate")
    ap.add_argument("--bf16-max", type=float, default=2e6, help="largest model for the bf16 measurement")
    ap.add_argument("--chunk", type=int, default=0, help="edges per tile (0: nowcast.stream.DEFAULT_CHUNK)")
    ap.add_argument("--no-train-step", action="store_true")
    ap.add_argument("--subgraphs", action="store_true", help="also time the per-block subgraph mode")
    ap.add_argument("--real", action="store_true", help="also measure errors on real trajectories")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--table", action="store_true", help="only rewrite the .md table and .png from the JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--real-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.real_worker:
        print(json.dumps(real_errors()))
        return 0
    doc = load_results(args.out)
    command = "python benchmarks/nowcast_cost.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if not args.table:
        doc["machine"] = machine()
        for s in [float(x) for x in args.sizes.split(",") if x]:
            if s not in SHAPES:
                ap.error(f"unknown size {s:g}; choose among {sorted(SHAPES)}")
            spec = {"target": s, "mat_limit_gb": args.mat_limit_gb, "bf16_max": args.bf16_max,
                    "chunk": args.chunk or None, "train_step": not args.no_train_step,
                    "subgraphs": args.subgraphs}
            print(f"size ~{s:.0e} ...", flush=True)
            res = run_worker(spec, args.timeout)
            res["command"] = command
            res["created"] = time.strftime("%Y-%m-%d %H:%M:%S")
            doc["sizes"][f"{s:.0e}"] = res
            print(json.dumps({k: res.get(k) for k in ("params", "stream", "materialised", "process_peak_bytes",
                                                      "budget_bytes", "error")}, default=str), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(doc, indent=1))
        if args.real:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--real-worker"]
            env = worker_env()
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.timeout)
            doc["real"] = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {"error": p.stderr[-3000:]}
            doc["real"]["command"] = command
            args.out.write_text(json.dumps(doc, indent=1))
    md = table(doc)
    args.out.with_suffix(".md").write_text(md)
    plot(doc, args.out.with_suffix(".png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

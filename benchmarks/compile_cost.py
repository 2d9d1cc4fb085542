#!/usr/bin/env python
"""Compile cost of neugraph, phase by phase, against model size.

For each model family and each target parameter count (about 1e4 up to 1e8) one *fresh* Python
process (``subprocess``, so nothing is shared between sizes) builds the model and runs the compile
pipeline ``repeats`` times, timing and measuring every phase on its own:

- ``capture``    ``frontends.capture.capture(module, x)`` (torch.export, non-strict)
- ``infer``      ``neugraph.infer.run(cap)`` + ``neugraph.ir.build(inference, cap, module)``
- ``emit``       ``neugraph.emit.emit(ir, profile="nino", lpe=0)`` (its ``lpe_blocks(.., 0)`` returns
                 at once, so this is emission without the Laplacian encoding)
- ``lpe``        ``[p for b in graph.blocks for p in b.bipartite()]`` + ``neugraph.lpe.lpe_blocks(V,
                 pieces, 8)``, i.e. exactly the LPE work that ``emit(..., lpe=8)`` adds. As a
                 cross-check ``emit(ir, lpe=8)`` is also timed (not counted in totals) and its node
                 features are compared with the directly computed ones.
- ``edge_index`` ``graph.edge_index`` materialised once (on the ``lpe=0`` graph).

Before each phase the worker runs ``gc.collect()`` and glibc ``malloc_trim(0)`` (so freed memory
the phase could silently reuse is given back to the OS), reads ``VmRSS`` from /proc/self/status as
the baseline, and resets the kernel's peak-RSS counter by writing ``5`` to /proc/self/clear_refs.
After the phase the peak extra memory is ``VmHWM - baseline`` (kernel-tracked, so no sampling gaps).
If clear_refs is not writable, a thread sampling VmRSS every 2 ms is used instead (the JSON says
which). Each worker first compiles a tiny model of the same family once (warm-up), so one-time
costs (lazy imports inside torch.export, first-call dispatch caches) are reported separately as
``cold_start`` and not mixed into the size scaling.

Usage::

    python benchmarks/compile_cost.py                 # full run, about 1e4 .. 1e8 parameters
    python benchmarks/compile_cost.py --quick         # smoke run, sizes up to ~1e6
    python benchmarks/compile_cost.py --max-params 5e7 --out /tmp/cc.json

Writes ``benchmarks/results/compile_cost.json`` (default ``--out``) and prints a table.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "compile_cost.json"
PHASES = ("capture", "infer", "emit", "lpe", "edge_index")
COMPILE_PHASES = ("capture", "infer", "emit", "lpe")  # what neugraph.compile does (edge_index is lazy)
TARGETS = (1e4, 3e4, 1e5, 3e5, 1e6, 3e6, 1e7, 3e7, 5e7, 1e8)
# per family: the largest target in a full run (the deep MLP grows the op count, not the width,
# so its cost per parameter is much higher and it stops earlier)
FAMILY_MAX = {"mlp": 1e8, "cnn": 1e8, "resnet": 1e8, "mlp_deep": 3e7}
LPE_K = 8
PROFILE = "nino"


# ---- model families ------------------------------------------------------------------------------
def _torch():
    import torch

    return torch


def make_mlp(width: int):
    """64 -> w -> w -> w -> w -> 10 with ReLU: three w x w layers, width scaled."""
    nn = _torch().nn
    layers = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def make_mlp_deep(depth: int):
    """64 -> 256 -> (depth x 256 -> 256) -> 10 with ReLU: width fixed, depth scaled."""
    nn = _torch().nn
    layers = [nn.Linear(64, 256), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    layers.append(nn.Linear(256, 10))
    return nn.Sequential(*layers)


def make_cnn(c: int):
    """VGG-like: 4 conv3x3-BN-ReLU layers (c, 2c, 4c, 4c), two max-pools, global pool, linear."""
    nn = _torch().nn

    def cbr(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(*cbr(3, c), *cbr(c, 2 * c), nn.MaxPool2d(2), *cbr(2 * c, 4 * c),
                         *cbr(4 * c, 4 * c), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4 * c, 10))


def make_resnet(c: int):
    """ResNet-18 layout (stages c, 2c, 4c, 8c; two basic blocks each; 1x1 conv+BN shortcuts)."""
    torch = _torch()
    nn = torch.nn

    class Basic(nn.Module):
        def __init__(self, i, o, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(i, o, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(o)
            self.conv2 = nn.Conv2d(o, o, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(o)
            self.short = None
            if stride != 1 or i != o:
                self.short = nn.Sequential(nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.short is None else self.short(x)))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
            blocks, i = [], c
            for s, o in enumerate((c, 2 * c, 4 * c, 8 * c)):
                blocks += [Basic(i, o, 1 if s == 0 else 2), Basic(o, o, 1)]
                i = o
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(8 * c, 10)

        def forward(self, x):
            x = self.blocks(self.stem(x))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return ResNet()


FAMILIES = {
    # name: (builder, example input shape, size knob name, knob range, tiny knob for warm-up)
    "mlp": (make_mlp, (2, 64), "width", (1, 1 << 15), 8),
    "cnn": (make_cnn, (2, 3, 16, 16), "channels", (1, 1 << 13), 2),
    "resnet": (make_resnet, (2, 3, 32, 32), "channels", (1, 1 << 12), 2),
    "mlp_deep": (make_mlp_deep, (2, 64), "depth", (0, 1 << 14), 1),
}


def count_params(family: str, knob: int) -> int:
    torch = _torch()
    with torch.device("meta"):
        m = FAMILIES[family][0](knob)
    return sum(p.numel() for p in m.parameters())


def knob_for(family: str, target: float) -> tuple[int, int]:
    """Knob whose parameter count is closest to ``target`` (binary search; monotone)."""
    lo, hi = FAMILIES[family][3]
    while lo < hi:
        mid = (lo + hi) // 2
        if count_params(family, mid) < target:
            lo = mid + 1
        else:
            hi = mid
    best = lo
    if lo > FAMILIES[family][3][0] and abs(count_params(family, lo - 1) - target) < abs(count_params(family, lo) - target):
        best = lo - 1
    return best, count_params(family, best)


# ---- memory measurement --------------------------------------------------------------------------
def _status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) / 1024.0  # MiB
    return out


def _rss() -> float:
    return _status()["VmRSS"]


try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
except OSError:  # not glibc
    _LIBC = None


def _settle() -> None:
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMeter:
    """Peak RSS above the baseline taken at ``__enter__`` (MiB)."""

    def __init__(self, method: str):
        self.method = method

    def __enter__(self):
        _settle()
        self.base = _rss()
        if self.method == "vmhwm_reset":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            self.peak = self.base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self.ru0 = resource.getrusage(resource.RUSAGE_SELF)
        self.t0 = time.perf_counter()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.user_seconds = ru.ru_utime - self.ru0.ru_utime
        self.sys_seconds = ru.ru_stime - self.ru0.ru_stime
        self.minor_faults = ru.ru_minflt - self.ru0.ru_minflt
        st = _status()
        if self.method == "vmhwm_reset":
            peak = st["VmHWM"]
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self.peak, st["VmRSS"])
        self.peak_extra_mb = max(peak - self.base, 0.0)
        _settle()  # after the peak is read: what the phase's result really keeps, not freed-but-cached heap
        self.retained_mb = _rss() - self.base
        return False


# ---- worker: one fresh process per (family, size) ------------------------------------------------
def _pipeline(module, x, meter_method: str, record: bool = True) -> dict:
    import importlib

    from frontends.capture import capture

    infer = importlib.import_module("neugraph.infer")
    irmod = importlib.import_module("neugraph.ir")
    emitmod = importlib.import_module("neugraph.emit")  # neugraph.emit is shadowed by the function
    lpemod = importlib.import_module("neugraph.lpe")
    torch = _torch()

    res: dict = {}

    def phase(name, fn):
        with PeakMeter(meter_method) as m:
            out = fn()
        res[name] = {"seconds": m.seconds, "user_seconds": m.user_seconds, "sys_seconds": m.sys_seconds,
                     "minor_faults": m.minor_faults, "peak_extra_mb": m.peak_extra_mb, "retained_mb": m.retained_mb,
                     "baseline_mb": m.base}
        return out

    cap = phase("capture", lambda: capture(module, x))
    ir = phase("infer", lambda: irmod.build(infer.run(cap), cap, module))
    graph = phase("emit", lambda: emitmod.emit(ir, profile=PROFILE, lpe=0))

    def lpe():
        pieces = [p for b in graph.blocks for p in b.bipartite()]
        return lpemod.lpe_blocks(graph.num_nodes, pieces, LPE_K)

    feats, _vals = phase("lpe", lpe)
    ei = phase("edge_index", lambda: graph.edge_index)
    if record:
        # cross-check (not counted): the real emit with the LPE, and the same node features
        _settle()
        t0 = time.perf_counter()
        g8 = emitmod.emit(ir, profile=PROFILE, lpe=LPE_K)
        res["_emit_lpe8_seconds"] = time.perf_counter() - t0
        res["_lpe_matches_emit"] = bool(torch.equal(g8.node_features[:, :LPE_K], feats))
        pieces = [p for b in graph.blocks for p in b.bipartite()]
        try:
            _cell, ncells = lpemod._cells(graph.num_nodes, pieces)
        except Exception:  # private helper; informational only
            ncells = None
        res["_stats"] = {
            "num_params": graph.num_params, "num_nodes": graph.num_nodes, "num_edges": graph.num_edges,
            "edge_index_shape": list(ei.shape), "edge_index_mb": ei.numel() * ei.element_size() / 2**20,
            "num_blocks": len(graph.blocks), "num_pieces": len(pieces), "lpe_cells": ncells,
            "fx_nodes": len(cap.graph.nodes), "capture_method": cap.method,
            "num_spaces": len(ir.spaces.parent), "unknown_ops": dict(ir.unknown_ops),
        }
        del g8
    del cap, ir, graph, feats, ei
    return res


def worker(spec: dict) -> dict:
    t_start = time.perf_counter()
    rss0 = _rss()
    import random

    import numpy as np

    torch = _torch()
    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    import frontends.capture  # noqa: F401
    import neugraph  # noqa: F401

    t_import = time.perf_counter() - t_start
    seed = spec["seed"]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    method = "vmhwm_reset" if _can_reset_hwm() else "vmrss_sampler_2ms"
    builder, in_shape, _, _, tiny = FAMILIES[spec["family"]]

    # warm-up on a tiny model of the same family: one-time costs, reported on their own
    _settle()
    r_before, t0 = _rss(), time.perf_counter()
    _pipeline(builder(tiny), torch.randn(*in_shape), method, record=False)
    _settle()
    cold = {"import_seconds": t_import, "import_rss_mb": r_before - rss0,
            "warmup_seconds": time.perf_counter() - t0, "warmup_rss_mb": _rss() - r_before}

    torch.manual_seed(seed)
    _settle()
    r_before, t0 = _rss(), time.perf_counter()
    module = builder(spec["knob"]).eval()
    x = torch.randn(*in_shape)
    build = {"seconds": time.perf_counter() - t0, "rss_mb": _rss() - r_before}
    runs = [_pipeline(module, x, method, record=(i == 0)) for i in range(spec["repeats"])]
    return {"runs": runs, "cold_start": cold, "model_build": build, "memory_method": method,
            "torch_threads": torch.get_num_threads()}


# ---- driver --------------------------------------------------------------------------------------
def _run_worker(spec: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.json"
        env = dict(os.environ)
        if spec["threads"] > 0:  # numpy's BLAS (LPE eigh) and OpenMP too, set before they load
            for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                env[var] = str(spec["threads"])
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--worker-out", str(out)]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timeout after {timeout:.0f} s"}
        wall = time.perf_counter() - t0
        if p.returncode != 0 or not out.exists():
            return {"error": f"worker exit {p.returncode}: {p.stderr.strip()[-2000:]}"}
        res = json.loads(out.read_text())
        res["process_wall_seconds"] = wall
        return res


def _median(xs):
    return statistics.median(xs) if xs else None


def summarise(raw: dict) -> dict:
    runs = raw["runs"]
    phases = {}
    for ph in PHASES:
        ts = [r[ph]["seconds"] for r in runs]
        ms = [r[ph]["peak_extra_mb"] for r in runs]
        cs = [r[ph]["user_seconds"] + r[ph]["sys_seconds"] for r in runs]
        phases[ph] = {"seconds_median": _median(ts), "seconds_first": ts[0], "seconds_min": min(ts),
                      "seconds_all": ts, "cpu_seconds_median": _median(cs),
                      "user_seconds_median": _median([r[ph]["user_seconds"] for r in runs]),
                      "sys_seconds_median": _median([r[ph]["sys_seconds"] for r in runs]),
                      "minor_faults_median": _median([r[ph]["minor_faults"] for r in runs]),
                      "peak_extra_mb_median": _median(ms),
                      "peak_extra_mb_all": ms, "retained_mb_median": _median([r[ph]["retained_mb"] for r in runs])}

    def totals(names):
        ts, ms, cs = [], [], []
        for r in runs:
            ts.append(sum(r[p]["seconds"] for p in names))
            cs.append(sum(r[p]["user_seconds"] + r[p]["sys_seconds"] for p in names))
            base0 = r[names[0]]["baseline_mb"]
            # absolute peak of phase p = its baseline + its peak extra; overall = max over phases
            ms.append(max(r[p]["baseline_mb"] + r[p]["peak_extra_mb"] for p in names) - base0)
        return {"seconds_median": _median(ts), "seconds_first": ts[0], "seconds_min": min(ts), "seconds_all": ts,
                "cpu_seconds_median": _median(cs), "peak_extra_mb_median": _median(ms), "peak_extra_mb_all": ms}

    first = runs[0]
    stats = first.get("_stats") or {}
    if stats.get("edge_index_mb"):
        phases["edge_index"]["peak_over_output"] = round(phases["edge_index"]["peak_extra_mb_median"]
                                                         / stats["edge_index_mb"], 3)
    return {
        "phases": phases,
        "compile_total": totals(list(COMPILE_PHASES)),
        "all_phases_total": totals(list(PHASES)),
        "emit_lpe8_seconds_crosscheck": first.get("_emit_lpe8_seconds"),
        "lpe_features_match_emit_lpe8": first.get("_lpe_matches_emit"),
        "graph": first.get("_stats"),
        "cold_start": raw["cold_start"],
        "model_build": raw["model_build"],
        "memory_method": raw["memory_method"],
        "torch_threads": raw["torch_threads"],
        "process_wall_seconds": raw.get("process_wall_seconds"),
    }


def _slope(points):
    """Least-squares slope of log(y) on log(x), with the number of points used."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y is not None and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    return round(sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx, 3)


def derived(results: list[dict]) -> dict:
    out: dict = {"slopes": {}, "notes": []}
    LARGE = 1e6
    for fam in sorted({r["family"] for r in results}):
        rows = [r for r in results if r["family"] == fam and "error" not in r]
        fam_out = {}
        for ph in list(PHASES) + ["compile_total", "all_phases_total"]:
            get = (lambda r: r["phases"][ph]) if ph in PHASES else (lambda r: r[ph])
            t_all = [(r["params"], get(r)["seconds_median"]) for r in rows]
            t_big = [(p, t) for p, t in t_all if p >= LARGE]
            # memory below a few MiB is page-granularity noise: fit only the large sizes, >= 1 MiB
            m_big = [(r["params"], get(r)["peak_extra_mb_median"]) for r in rows if r["params"] >= LARGE]
            m_big = [(p, m) for p, m in m_big if m is not None and m >= 1.0]
            c_big = [(r["params"], get(r)["cpu_seconds_median"]) for r in rows if r["params"] >= LARGE]
            f_big = [(r["params"], get(r)["seconds_first"]) for r in rows if r["params"] >= LARGE]
            fam_out[ph] = {"time_slope_all_sizes": _slope(t_all), "time_slope_params_ge_1e6": _slope(t_big),
                           "cpu_time_slope_params_ge_1e6": _slope(c_big),
                           "first_run_time_slope_params_ge_1e6": _slope(f_big), "n_ge_1e6": len(t_big), "memory_slope_params_ge_1e6": _slope(m_big),
                           "n_memory": len(m_big)}
        out["slopes"][fam] = fam_out
    # "about linear": no phase's time or memory grows faster than params^1.15 over sizes >= 1e6
    superlinear = []
    for fam, fo in out["slopes"].items():
        for ph, s in fo.items():
            for key in ("time_slope_params_ge_1e6", "memory_slope_params_ge_1e6"):
                if s[key] is not None and s[key] > 1.15:
                    superlinear.append(f"{fam}/{ph}: {key}={s[key]}")
    out["superlinear_threshold"] = 1.15
    out["superlinear"] = superlinear
    out["growth_about_linear_or_better"] = not superlinear
    out["notes"].append(
        "slope = least-squares d log(y) / d log(params); 1 is linear, ~0 means the cost does not depend on "
        "width (constant per op); width-scaled families keep the op count fixed, mlp_deep scales it")
    # the 50M MLP check
    cand = [r for r in results if r["family"] == "mlp" and "error" not in r and r["target"] == 5e7]
    if cand:
        r = cand[0]
        out["mlp_50m"] = {
            "params": r["params"],
            "all_phases_seconds": r["all_phases_total"]["seconds_median"],
            "all_phases_peak_extra_mb": r["all_phases_total"]["peak_extra_mb_median"],
            "compile_only_seconds": r["compile_total"]["seconds_median"],
            "compile_only_peak_extra_mb": r["compile_total"]["peak_extra_mb_median"],
            "per_phase": {ph: {"seconds": r["phases"][ph]["seconds_median"],
                               "peak_extra_mb": r["phases"][ph]["peak_extra_mb_median"]} for ph in PHASES},
            "under_60s": r["all_phases_total"]["seconds_median"] < 60.0,
            "under_4gb": r["all_phases_total"]["peak_extra_mb_median"] < 4096.0,
            "pass": (r["all_phases_total"]["seconds_median"] < 60.0
                     and r["all_phases_total"]["peak_extra_mb_median"] < 4096.0),
            "definition": "all five phases incl. edge_index; time = median over repeats of the per-run sum "
                          "of the five phase times; memory = median over repeats of (peak RSS during the run "
                          "minus RSS before capture; model weights already resident)",
        }
    else:
        out["mlp_50m"] = None
    return out


def machine_info() -> dict:
    import numpy
    import torch

    info = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "torch_threads": torch.get_num_threads(),
        "libc": " ".join(platform.libc_ver()),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        with open("/proc/meminfo") as f:
            info["mem_total_gb"] = round(int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return info


def code_version() -> dict:
    h = hashlib.sha256()
    files = sorted(list((ROOT / "neugraph").glob("*.py")) + list((ROOT / "frontends").glob("*.py")))
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip() or None
    except OSError:
        head = None
    return {"git_head": head, "sha256_neugraph_frontends_sources": h.hexdigest(), "files": [f.name for f in files]}


def _fmt_t(s):
    if s is None:
        return "-"
    return f"{s * 1e3:.1f}ms" if s < 1 else f"{s:.2f}s"


def _fmt_m(m):
    if m is None:
        return "-"
    return f"{m:.0f}M" if m >= 10 else f"{m:.1f}M"


def print_table(results: list[dict]) -> None:
    cols = list(PHASES) + ["compile_total", "all_phases_total"]
    short = {"compile_total": "compile", "all_phases_total": "all+ei"}
    head = f"{'family':<9}{'params':>11}{'rep':>4} " + "".join(f"{short.get(c, c):>18}" for c in cols)
    print(head)
    print(" " * 25 + "".join(f"{'time / peak-extra':>18}" for _ in cols))
    print("-" * len(head))
    for r in results:
        if "error" in r:
            print(f"{r['family']:<9}{r['params']:>11,}  ERROR {r['error'][:100]}")
            continue
        cells = []
        for c in cols:
            d = r["phases"][c] if c in PHASES else r[c]
            cells.append(f"{_fmt_t(d['seconds_median'])} / {_fmt_m(d['peak_extra_mb_median'])}")
        print(f"{r['family']:<9}{r['params']:>11,}{r['repeats']:>4} " + "".join(f"{c:>18}" for c in cells))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: sizes up to ~1e6 parameters")
    ap.add_argument("--max-params", type=float, default=None, help="largest target parameter count (default 1e8, and 3e7 for mlp_deep; "
                         "when given it applies to every family)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT.relative_to(ROOT)})")
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of " + ",".join(FAMILIES))
    ap.add_argument("--repeats", type=int, default=3, help="repeats per size (median reported)")
    ap.add_argument("--large-repeats", type=int, default=3, help="repeats for targets above --large-threshold")
    ap.add_argument("--large-threshold", type=float, default=6e7)
    ap.add_argument("--min-params", type=float, default=0.0, help="smallest target parameter count")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch/OpenMP/BLAS threads in each worker (0 = library default). Default 1: every "
                         "phase is serial Python or memory-bound, and on a shared machine 2 spinning OpenMP "
                         "threads make wall times several times noisier")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300.0, help="per-process timeout in seconds")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        res = worker(json.loads(args.worker))
        Path(args.worker_out).write_text(json.dumps(res))
        return 0

    max_params = args.max_params if args.max_params is not None else (1e6 if args.quick else 1e8)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    for f in families:
        if f not in FAMILIES:
            ap.error(f"unknown family {f!r}; choose from {', '.join(FAMILIES)}")
    t_start = time.perf_counter()
    results = []
    for fam in families:
        cap = min(max_params, FAMILY_MAX[fam]) if args.max_params is None else max_params
        seen = set()
        for target in [t for t in TARGETS if args.min_params * 0.9999 <= t <= cap * 1.0001]:
            knob, params = knob_for(fam, target)
            if knob in seen:  # e.g. the deep MLP cannot go below ~19k parameters
                continue
            seen.add(knob)
            repeats = args.large_repeats if target > args.large_threshold else args.repeats
            spec = {"family": fam, "knob": knob, "repeats": repeats, "seed": args.seed, "threads": args.threads}
            load_before = os.getloadavg()
            raw = _run_worker(spec, args.timeout)
            row = {"family": fam, "target": target, "params": params, FAMILIES[fam][2]: knob,
                   "input_shape": list(FAMILIES[fam][1]), "repeats": repeats,
                   "loadavg_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}
            if "error" in raw:
                row["error"] = raw["error"]
                print(f"[{time.perf_counter() - t_start:6.1f}s] {fam} {params:,}: ERROR {raw['error'][:300]}", flush=True)
            else:
                row.update(summarise(raw))
                tot = row["all_phases_total"]
                print(f"[{time.perf_counter() - t_start:6.1f}s] {fam:<8} {params:>12,} params  "
                      f"all phases {_fmt_t(tot['seconds_median'])}, peak +{_fmt_m(tot['peak_extra_mb_median'])}"
                      f"  (x{repeats}, process {raw['process_wall_seconds']:.1f}s)", flush=True)
            results.append(row)

    doc = {
        "benchmark": "neugraph compile cost by phase vs model size",
        "command": shlex.join([sys.executable] + sys.argv),
        "cwd": str(Path.cwd()),
        "created_unix": time.time(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "total_wall_seconds": time.perf_counter() - t_start,
        "machine": machine_info(),
        "code": code_version(),
        "settings": {
            "quick": args.quick, "max_params": max_params, "families": families, "targets": list(TARGETS),
            "family_max_params_full_run": FAMILY_MAX, "repeats": args.repeats,
            "large_repeats": args.large_repeats, "large_threshold": args.large_threshold,
            "profile": PROFILE, "lpe_k": LPE_K, "batch": 2, "min_params": args.min_params,
            "worker_threads": args.threads if args.threads > 0 else "library default",
            "seeds": {"torch/numpy/random (model init, example input)": args.seed,
                      "neugraph.lpe cell hashing (fixed inside lpe._cells)": 12345},
        },
        "method": {
            "isolation": "one fresh python subprocess per (family, size); a tiny model of the same family is "
                         "compiled once first (warm-up, reported as cold_start) so one-time costs are not "
                         "attributed to the size",
            "timing": "time.perf_counter around each phase; user/sys CPU seconds and minor page faults from "
                      "getrusage(RUSAGE_SELF) (all threads); "
                      "median over repeats within the process (seconds_first, seconds_min and every value are kept "
                      "too; the first repeat of a large allocation-heavy phase is often slower: fresh pages). "
                      "loadavg_1min_before_after records competing load on the machine",
            "memory": "before each phase: gc.collect + glibc malloc_trim(0), baseline = VmRSS, then the kernel "
                      "peak (VmHWM) is reset by writing 5 to /proc/self/clear_refs; peak_extra = VmHWM after the "
                      "phase - baseline ('vmhwm_reset'). Fallback if clear_refs is not writable: a thread "
                      "sampling VmRSS every 2 ms ('vmrss_sampler_2ms'). Each row's memory_method says which. "
                      "retained = VmRSS after the phase and another gc + malloc_trim - baseline (what the phase's "
                      "result keeps alive). edge_index.peak_over_output = its peak extra / size of the (2, E) int64 "
                      "result",
            "phases": {
                "capture": "frontends.capture.capture(module, x)  (torch.export non-strict)",
                "infer": "neugraph.infer.run(cap) + neugraph.ir.build(inference, cap, module)",
                "emit": f"neugraph.emit.emit(ir, profile='{PROFILE}', lpe=0)",
                "lpe": f"pieces = [p for b in graph.blocks for p in b.bipartite()]; "
                       f"neugraph.lpe.lpe_blocks(graph.num_nodes, pieces, {LPE_K}) -- measured directly, not as a "
                       f"difference; emit(lpe={LPE_K}) is timed once as a cross-check "
                       "(emit_lpe8_seconds_crosscheck) and its node features are compared "
                       "(lpe_features_match_emit_lpe8)",
                "edge_index": "graph.edge_index on the lpe=0 graph, materialised once",
            },
            "totals": "compile_total = capture+infer+emit+lpe (what neugraph.trace+compile do); "
                      "all_phases_total adds edge_index. Peak of a total = max over its phases of "
                      "(phase baseline + phase peak) - baseline before capture",
        },
        "results": results,
        "derived": derived(results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print()
    print_table(results)
    d = doc["derived"]
    print()
    print("time slope d log t / d log params (sizes >= 1e6; all sizes in parentheses):")
    for fam, fo in d["slopes"].items():
        print(f"  {fam:<9}" + "  ".join(f"{ph}={fo[ph]['time_slope_params_ge_1e6']}({fo[ph]['time_slope_all_sizes']})"
                                        for ph in list(PHASES) + ["all_phases_total"]))
    print("cpu-time (user+sys) slope, sizes >= 1e6:")
    for fam, fo in d["slopes"].items():
        print(f"  {fam:<9}" + "  ".join(f"{ph}={fo[ph]['cpu_time_slope_params_ge_1e6']}"
                                        for ph in list(PHASES) + ["all_phases_total"]))
    print("memory slope (sizes >= 1e6, peaks >= 1 MiB):")
    for fam, fo in d["slopes"].items():
        print(f"  {fam:<9}" + "  ".join(f"{ph}={fo[ph]['memory_slope_params_ge_1e6']}" for ph in list(PHASES)))
    print(f"super-linear (> {d['superlinear_threshold']}): {d['superlinear'] or 'none'}")
    if d["mlp_50m"]:
        m = d["mlp_50m"]
        print(f"50M MLP ({m['params']:,} params): all phases {m['all_phases_seconds']:.2f} s, peak "
              f"+{m['all_phases_peak_extra_mb']:.0f} MiB -> {'PASS' if m['pass'] else 'FAIL'} (< 60 s, < 4 GiB)")
    print(f"\nwrote {args.out}  ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

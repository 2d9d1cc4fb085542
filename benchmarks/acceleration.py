"""Acceleration benchmark (../shared/docs/BENCHMARKS.md section 1): steps to target, per task and method.

Every method trains the same task from the same initial weights on the same batch stream
(``nowcast.train.run_training``; batches aligned by step index), for the task's full step budget,
evaluating on the full held-out set every ``eval_every`` steps and, until the target is first reached,
checking it every ``Task.target_every`` steps (vision: 10, so steps to target are exact to 10). Per task the table gives, for each
method, the median over seeds of the first evaluated step at which the target is reached and the
reduction in % against AdamW's median, plus the median final score and its difference to AdamW.
A run that never reaches the target counts as "not reached" (it sorts above every step count, so a
median over three seeds is a number only when at least two reached it).

Runs are cached one JSON per (task, method, seed, steps) under ``--out``/runs, so the benchmark can
be stopped and resumed, and grown one task or seed at a time (a cached run is redone when its
checkpoint file or the task's target-check interval changed); the summary (JSON, Markdown table and
one plot per task) is rebuilt from every cached run each time.

    python benchmarks/acceleration.py --tasks fm16 --seeds 0,1,2            # all methods
    python benchmarks/acceleration.py --tasks fm16 --methods adamw,nino-ours --seeds 0
    python benchmarks/acceleration.py --summary-only                          # rebuild table/plots
    python benchmarks/acceleration.py --tasks bible-3-24 --methods nino-ours --ours CAND.safetensors \
        --out benchmarks/results/candidates/NAME                               # a candidate, before shipping

Methods: ``adamw``; ``no-change`` (the control: AdamW in the same wrapper with ``nowcast.NoChange``,
so every nowcast step's AdamW update is skipped and nothing else changes; its spread around AdamW is
how far a small perturbation alone moves a task's result); ``linefit``, ``linefit+`` (no weights;
NiNo's k-decay from 40, so the first nowcast extrapolates 40 state spacings); ``linefit-kK``,
``linefit+-kK`` (the same with the k-decay from ``K`` down to 1: the short-horizon baselines);
``wnn+`` (published ``nino_mlp.pt``);
``nino-published`` (published ``nino_no_posw.pt``); ``nino-ours-gated`` (the shipped default,
``nowcast.shipped()``: the package checkpoint behind ``SkillGate(0.9)``, see below); ``nino-ours``
(the package checkpoint v6 alone, every parameter nowcast); the variants below run that checkpoint
with one change each:
``nino-ours-auto`` (``NiNo(hold="auto")``: biases and norm parameters of a model with normalisation
layers are left to AdamW; the vision nets have none, so there it is ``nino-ours`` exactly);
``nino-ours-dynamic`` (with ``DynamicPeriod()``); ``nino-ours-guarded`` (with
``run_training(guard=1.0)``: a nowcast that raises its step's training loss is undone and AdamW
takes that step instead, so a run whose every nowcast is undone is the AdamW run);
``nino-ours-norms-held`` (``NiNo(hold="norms")``: the nowcast leaves LayerNorm/RMSNorm
parameters where they are; the vision nets have none, so there it is ``nino-ours`` exactly);
``nino-ours-embeddings-held`` (``NiNo(hold="embeddings")``: token and position
embedding tables, the tied output head with them, are left to AdamW's trajectory);
``nino-ours-skip-k1`` (``NiNo(min_k=2)``: the k-decay's last nowcast, ``k=1`` at the
run's final step, is skipped and AdamW takes that step);
``nino-ours-skip-k3`` / ``nino-ours-skip-k5`` (``NiNo(min_k=4)`` / ``min_k=6``: the last two / three
nowcasts of the decay, k = 3, 1 / k = 5, 3, 1, are left to AdamW);
``nino-ours-gated`` (``run_training(gate=0.9)``, ``nowcast.gate.SkillGate``: at the first nowcast the
checkpoint is backtested on the run's first half-period; the run nowcasts as ``nino-ours`` if that
beat no change by 10%, else it is the ``no-change`` control); ``nino-ours-gated-every`` (the same
test at every nowcast, ``gate_every_cycle=True``). The published
files are looked up in ``$NOWCAST_REFERENCE`` or ``../shared/reference/checkpoints`` beside the repository; a method
whose checkpoint is missing is skipped and the skip is recorded.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nowcast  # noqa: E402
from nowcast.schedule import DynamicPeriod  # noqa: E402
from nowcast.tasks import TASKS, get_task, load_task_data  # noqa: E402
from nowcast.train import run_training  # noqa: E402

METHODS = ["adamw", "no-change", "linefit", "linefit+", "wnn+", "nino-published", "nino-ours-gated", "nino-ours",
           "nino-ours-auto", "nino-ours-dynamic", "nino-ours-guarded", "nino-ours-norms-held",
           "nino-ours-embeddings-held", "nino-ours-skip-k1", "nino-ours-skip-k3", "nino-ours-skip-k5",
           "nino-ours-gated-every"]
LABELS = {"adamw": "AdamW", "no-change": "No change (control)", "linefit": "Linefit", "linefit+": "Linefit+",
          "wnn+": "WNN+ (published)",
          "nino-published": "NiNo (published nino_no_posw)", "nino-ours": "NiNo (ours, v6)",
          "nino-ours-auto": "NiNo (ours, v6) + hold='auto'",
          "nino-ours-dynamic": "NiNo (ours, v6) + dynamic period",
          "nino-ours-guarded": "NiNo (ours, v6) + loss guard",
          "nino-ours-norms-held": "NiNo (ours, v6) + norms held",
          "nino-ours-embeddings-held": "NiNo (ours, v6) + embeddings held",
          "nino-ours-skip-k1": "NiNo (ours, v6), k=1 nowcast skipped",
          "nino-ours-skip-k3": "NiNo (ours, v6), k<=3 nowcasts skipped",
          "nino-ours-skip-k5": "NiNo (ours, v6), k<=5 nowcasts skipped",
          "nino-ours-gated": "NiNo (ours, v6) + skill gate 0.9 = shipped default",
          "nino-ours-gated-every": "NiNo (ours, v6) + skill gate 0.9 at every nowcast"}
#: ``linefit-kK`` / ``linefit+-kK``: Linefit(+) under a k-decay from K instead of 40
SHORT_LINEFIT = re.compile(r"^(linefit\+?)-k([1-9][0-9]*)$")
#: ``run_training(guard=...)`` per method: a nowcast that raises that step's training loss is undone
#: and AdamW takes the step
GUARDS = {"nino-ours-guarded": 1.0}
#: ``run_training(hold=...)`` per method (``NiNo(hold=)``)
HOLDS = {"nino-ours-auto": "auto", "nino-ours-norms-held": "norms", "nino-ours-embeddings-held": "embeddings"}
_RESOLVED_HOLDS: dict = {}


def resolved_hold(method: str, task: Any) -> Any:
    """What ``HOLDS[method]`` resolves to on ``task``'s model (``"auto"`` depends on its layers):
    the value a current run records."""
    hold = HOLDS.get(method)
    if hold != "auto":
        return hold
    if task.name not in _RESOLVED_HOLDS:
        from nowcast.optim import resolve_hold
        from nowcast.tasks import build_model
        _RESOLVED_HOLDS[task.name] = resolve_hold(hold, build_model(task, 0))
    return _RESOLVED_HOLDS[task.name]
#: ``run_training(min_k=...)`` per method (``NiNo(min_k=)``): nowcasts with a smaller horizon are skipped
MIN_KS = {"nino-ours-skip-k1": 2, "nino-ours-skip-k3": 4, "nino-ours-skip-k5": 6}
#: ``run_training(gate=...)`` per method: ``nowcast.gate.SkillGate(threshold)`` around the checkpoint
#: (the run records at ``ctx=10``, half the spacing, and nowcasts from every second state only when
#: the gate is open: decided at the first nowcast, or for the methods in GATE_EVERY at every one)
GATES = {"nino-ours-gated": nowcast.SHIPPED_GATE, "nino-ours-gated-every": nowcast.SHIPPED_GATE}
GATE_EVERY = {"nino-ours-gated-every"}
OUT = ROOT / "benchmarks" / "results" / "acceleration"


def label(method: str) -> str:
    m = SHORT_LINEFIT.match(method)
    return f"{LABELS[m.group(1)]} (k from {m.group(2)})" if m else LABELS.get(method, method)


def _order(method: str) -> tuple:
    """Table order: METHODS' order, each ``linefit(+)-kK`` after its Linefit row, unknown names last."""
    m = SHORT_LINEFIT.match(method)
    name, k = (m.group(1), int(m.group(2))) if m else (method, 0)
    return (METHODS.index(name) if name in METHODS else len(METHODS), k, method)


def max_horizon(method: str) -> int:
    """The k the method's k-decay starts from: 40 (the published schedule) unless it is ``linefit(+)-kK``."""
    m = SHORT_LINEFIT.match(method)
    return int(m.group(2)) if m else 40


def reference_dir() -> Path:
    env = os.environ.get("NOWCAST_REFERENCE")
    return Path(env) if env else ROOT.parent / "shared" / "reference" / "checkpoints"


OURS: Optional[Path] = None  # --ours: the checkpoint measured as nino-ours (default: the shipped one)


def method_file(name: str) -> Optional[Path]:
    """The checkpoint file a method loads (None for methods without one)."""
    from nowcast.cli import SHIPPED_CHECKPOINT

    ours = OURS or SHIPPED_CHECKPOINT
    files = {"wnn+": reference_dir() / "nino_mlp.pt", "nino-published": reference_dir() / "nino_no_posw.pt",
             "nino-ours": ours, "nino-ours-auto": ours, "nino-ours-dynamic": ours, "nino-ours-guarded": ours, "nino-ours-norms-held": ours,
             "nino-ours-embeddings-held": ours, "nino-ours-skip-k1": ours,
             "nino-ours-skip-k3": ours, "nino-ours-skip-k5": ours, "nino-ours-gated": ours,
             "nino-ours-gated-every": ours}
    return files.get(name)


def make_method(name: str, task_period: int = 1000) -> tuple[Any, Any]:
    """(nowcaster or None, period) for a method name; raises FileNotFoundError for a missing checkpoint.

    The constant period is the task's own (``Task.period``: 1000 for the paper's vision tasks, a
    tenth of the budget for the short language tasks); the dynamic one spans a fifth to twice it.
    """
    if name == "adamw":
        return None, task_period
    if name == "no-change":
        return nowcast.NoChange(), task_period
    if name == "linefit":
        return nowcast.Linefit(), task_period
    if name == "linefit+":
        return nowcast.LinefitPlus(), task_period
    short = SHORT_LINEFIT.match(name)
    if short:
        cls = nowcast.Linefit if short.group(1) == "linefit" else nowcast.LinefitPlus
        return cls(horizon=int(short.group(2))), task_period
    path = method_file(name)
    if path is None:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{name}: checkpoint {path} not found")
    dynamic = DynamicPeriod(min_period=task_period // 5, max_period=2 * task_period)
    return nowcast.load(path), dynamic if name.endswith("-dynamic") else task_period


def checkpoint_sha256(method: str) -> Optional[str]:
    """SHA-256 of the checkpoint file a method loads (None for methods without one)."""
    path = method_file(method)
    return _sha256(Path(path)) if path and Path(path).is_file() else None


@functools.lru_cache(maxsize=None)
def _sha256_cached(path: Path, mtime_ns: int, size: int) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sha256(path: Path) -> str:
    st = path.stat()
    return _sha256_cached(path.resolve(), st.st_mtime_ns, st.st_size)


def stale(rec: dict, task: Any, method: str) -> Optional[str]:
    """Why a cached run no longer measures the current method and protocol (None: still valid)."""
    for key in ("lr", "weight_decay", "batch_size", "target"):
        if key in rec and rec[key] != getattr(task, key):
            return f"{key} {rec[key]!r}, the task now has {getattr(task, key)!r}"
    if rec.get("target_every", 0) != (task.target_every if 0 < task.target_every < rec["eval_every"] else 0):
        return f"target checked every {rec.get('target_every', 0)} steps, the task now asks {task.target_every}"
    if rec.get("checkpoint_sha256") != checkpoint_sha256(method):
        return "the method's checkpoint file changed"
    if rec["nowcasts"] + rec["nowcasts_rejected"] and (rec.get("max_k") or 40) != max_horizon(method):
        return f"k-decay from {rec.get('max_k') or 40}, the method now asks {max_horizon(method)}"
    if rec.get("hold") != resolved_hold(method, task):
        return f"hold={rec.get('hold')!r}, the method now asks {resolved_hold(method, task)!r}"
    if (rec.get("min_k") or 1) != MIN_KS.get(method, 1) and rec["nowcasts"] + rec["nowcasts_rejected"]:
        return f"min_k={rec.get('min_k') or 1}, the method now asks {MIN_KS.get(method, 1)}"
    if rec.get("gate") != GATES.get(method) and rec["nowcasts"] + rec["nowcasts_rejected"]:
        return f"skill gate {rec.get('gate')!r}, the method now asks {GATES.get(method)!r}"
    if method in GATES and bool(rec.get("gate_every_cycle")) != (method in GATE_EVERY):
        return f"gate_every_cycle={rec.get('gate_every_cycle')!r}, the method now asks {method in GATE_EVERY}"
    return None


def run_file(out: Path, task: str, method: str, seed: int, steps: int) -> Path:
    return out / "runs" / f"{task}__{method}__s{seed}__{steps}.json"


def _median_steps(values: list[Optional[int]]) -> Optional[float]:
    """Median with "not reached" as +inf; None when the median itself is not reached."""
    xs = sorted(math.inf if v is None else v for v in values)
    if not xs:
        return None
    m = statistics.median(xs)
    return None if math.isinf(m) else float(m)


def cached_runs(out: Path) -> tuple[list[dict], list[str]]:
    """(runs that still measure the current methods and protocol, 'file: why' for the stale ones)."""
    runs, stale_runs = [], []
    for p in sorted((out / "runs").glob("*.json")):
        r = json.loads(p.read_text())
        why = stale(r, get_task(r["task"]), r["method"]) if r["task"] in TASKS else None
        if why is None:
            runs.append(r)
        else:
            stale_runs.append(f"{p.name}: {why}")
    return runs, stale_runs


def _worst_seed_gap(metric: str, rs: list[dict], base: list[dict]) -> Optional[float]:
    """The worst per-seed final-score gap to AdamW on the same seed (None: no shared seed).

    Accuracy: the lowest ``final - AdamW`` in points; perplexity: the highest, in % of AdamW's.
    The acceptance bound on final scores (0.5 points / 2%) is checked per seed against this."""
    by_seed = {r["seed"]: r["final_score"] for r in base}
    if metric == "perplexity":
        gaps = [100 * (r["final_score"] / by_seed[r["seed"]] - 1) for r in rs if r["seed"] in by_seed]
        return round(max(gaps), 2) if gaps else None
    gaps = [r["final_score"] - by_seed[r["seed"]] for r in rs if r["seed"] in by_seed]
    return round(min(gaps), 3) if gaps else None


def _cpu(r: dict) -> str:
    """A record's CPU, short ("AMD EPYC", "Intel Xeon @ 2.80GHz"); older records did not keep it."""
    cpu = r.get("cpu")
    return " ".join(cpu.replace("(R)", "").replace("(TM)", "").replace(" Processor", "").split()) if cpu else "not recorded"


def _pairs_share_a_cpu(rs: list[dict], base: list[dict]) -> Optional[bool]:
    """Whether every per-seed pair behind the worst-seed gap ran on one recorded CPU (None: no pair).
    The CPU alone moves AdamW's final perplexity by more than the 2% bound (README, "The skill gate")."""
    by_seed = {r["seed"]: r for r in base}
    pairs = [(r, by_seed[r["seed"]]) for r in rs if r["seed"] in by_seed]
    if not pairs:
        return None
    return all(a.get("cpu") and a.get("cpu") == b.get("cpu") for a, b in pairs)


def _records_share_a_cpu(rs: list[dict], base: list[dict]) -> Optional[bool]:
    """Whether every record behind a median reduction (the method's and AdamW's) names one CPU.
    The CPU alone moves steps to target by a third (MNIST/32 AdamW median: 5,620 on an older CPU,
    4,660 on an AMD EPYC), so a reduction across CPUs is not a measurement of the method."""
    if not rs or not base:
        return None
    cpus = {r.get("cpu") for r in rs + base}
    return len(cpus) == 1 and None not in cpus


def summarise(out: Path) -> dict:
    """Rows over the cached runs that still measure the current methods; stale ones are listed, not counted."""
    runs, stale_runs = cached_runs(out)
    by: dict[tuple[str, int], dict[str, list[dict]]] = {}
    for r in runs:
        by.setdefault((r["task"], r["steps"]), {}).setdefault(r["method"], []).append(r)
    rows = []
    for (task, steps), methods in sorted(by.items()):
        base = methods.get("adamw", [])
        base_med = _median_steps([r["steps_to_target"] for r in base])
        base_final = statistics.median([r["final_score"] for r in base]) if base else None
        for m in sorted(methods, key=_order):
            rs = sorted(methods[m], key=lambda r: r["seed"])
            med = _median_steps([r["steps_to_target"] for r in rs])
            final = statistics.median([r["final_score"] for r in rs])
            rows.append({
                "task": task, "steps": steps, "method": m, "label": label(m), "seeds": [r["seed"] for r in rs],
                "steps_to_target": [r["steps_to_target"] for r in rs], "median_steps_to_target": med,
                "reduction_pct": (None if med is None or base_med is None else round(100 * (1 - med / base_med), 1)),
                # AdamW never reached the target: the reduction is at least that against the whole budget
                "reduction_at_least_pct": (round(100 * (1 - med / steps), 1) if med is not None and base_med is None
                                           and base else None),
                "final_scores": [round(r["final_score"], 3) for r in rs], "median_final_score": round(final, 3),
                "final_vs_adamw": None if base_final is None else round(final - base_final, 3),
                "worst_seed_final_vs_adamw": None if m == "adamw" else _worst_seed_gap(rs[0]["metric"], rs, base),
                "worst_seed_same_cpu": None if m == "adamw" else _pairs_share_a_cpu(rs, base),
                "reduction_same_cpu": None if m == "adamw" else _records_share_a_cpu(rs, base),
                "cpus": sorted({_cpu(r) for r in rs}),
                "metric": rs[0]["metric"], "target": rs[0]["target"], "eval_every": rs[0]["eval_every"],
                "target_every": rs[0].get("target_every", 0),
                "nowcasts": [r["nowcasts"] for r in rs], "rejected": [r["nowcasts_rejected"] for r in rs],
                "median_wall_time_s": round(statistics.median([r["wall_time_s"] for r in rs]), 1),
            })
    return {"rows": rows, "runs": len(runs), "stale_runs": stale_runs}


def write_summary(out: Path, meta: dict) -> dict:
    summary = summarise(out)
    summary.update(meta)
    (out / "acceleration.json").write_text(json.dumps(summary, indent=1))
    lines = ["| task | method | seeds | steps to target (median) | reduction vs AdamW | final score (median) | "
             "final - AdamW | worst seed vs AdamW | CPU |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        med = "not reached" if r["median_steps_to_target"] is None else f"{r['median_steps_to_target']:,.0f}"
        red = "" if r["reduction_pct"] is None or r["method"] == "adamw" else f"{r['reduction_pct']:.1f}%"
        if r.get("reduction_at_least_pct") is not None and r["method"] != "adamw":
            red = f">= {r['reduction_at_least_pct']:.1f}% (AdamW: not reached in {r['steps']:,})"
        if red and r.get("reduction_same_cpu") is False:
            red += " *"
        diff = "" if r["final_vs_adamw"] is None or r["method"] == "adamw" else f"{r['final_vs_adamw']:+.2f}"
        if diff and r["metric"] == "perplexity":  # the acceptance bound for perplexity is relative (2%)
            diff += f" ({100 * r['final_vs_adamw'] / (r['median_final_score'] - r['final_vs_adamw']):+.1f}%)"
        worst = r.get("worst_seed_final_vs_adamw")
        worst_s = "" if worst is None else (f"{worst:+.1f}%" if r["metric"] == "perplexity" else f"{worst:+.2f}")
        if worst_s and r.get("worst_seed_same_cpu") is False:
            worst_s += " *"
        lines.append(f"| {r['task']} ({r['metric']} target {r['target']}) | {r['label']} | {len(r['seeds'])} | {med} "
                     f"| {red} | {r['median_final_score']:.2f} | {diff} | {worst_s} | {', '.join(r['cpus'])} |")
    if any(r.get("worst_seed_same_cpu") is False or r.get("reduction_same_cpu") is False
           for r in summary["rows"]):
        lines += ["", "\\* the records behind this figure are not known to share a CPU (one of them ran on "
                  "another CPU, or does not name its CPU); the CPU alone can move a run's final score by more "
                  "than the 0.5-point / 2% bound and its steps to target by a third, so only unmarked figures "
                  "compare a method with AdamW on one machine."]
    if summary["stale_runs"]:
        lines += ["", f"Not counted ({len(summary['stale_runs'])} cached runs of an older checkpoint or protocol; "
                  "rerun them with the same command): " + "; ".join(summary["stale_runs"])]
    (out / "acceleration.md").write_text("\n".join(lines) + "\n")
    _plots(out)
    return summary


def _plots(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, _ = cached_runs(out)
    for task in sorted({r["task"] for r in runs}):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        tr = [r for r in runs if r["task"] == task]
        for m in [x for x in METHODS if any(r["method"] == x for r in tr)]:
            rs = [r for r in tr if r["method"] == m]
            for i, r in enumerate(rs):
                ax.plot(r["eval_steps"], r["scores"], lw=1, alpha=0.8, color=f"C{METHODS.index(m)}",
                        label=LABELS[m] if i == 0 else None)
        ax.axhline(tr[0]["target"], color="k", ls="--", lw=0.8, label=f"target {tr[0]['target']}")
        ax.set_xlabel("step")
        ax.set_ylabel(f"validation {tr[0]['metric']}")
        if tr[0]["metric"] == "accuracy":
            top = max(max(r["scores"]) for r in tr)
            ax.set_ylim(max(0, top - 15), top + 1)
        else:
            ax.set_yscale("log")
        ax.set_title(f"{task}: every seed, every method")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"acceleration_{task}.png", dpi=110)
        plt.close(fig)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    """What a run's floating-point result depends on besides the code: the nowcasters' scores are
    chaotic in rounding (README, "Rounding: symmetry replicas"), so the same command on another CPU or library build
    can give another step count."""
    import importlib.metadata as md

    from nowcast.scatter import get_backend

    def version(pkg: str) -> Optional[str]:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus", "cpu": cpu_model(),
            "torch": torch.__version__, "transformers": version("transformers"), "scatter": get_backend()}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="fm16", help=f"comma-separated tasks from {', '.join(TASKS)}")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=None, help="override the task's step budget (smoke runs)")
    p.add_argument("--eval-every", type=int, default=None, help="override the task's evaluation interval")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: fastest for these small models on a shared CPU)")
    p.add_argument("--force", action="store_true", help="rerun cached runs")
    p.add_argument("--ours", type=Path, default=None,
                   help="checkpoint measured as nino-ours (default: the shipped one); use with its own --out "
                        "to compare a candidate before shipping it")
    p.add_argument("--summary-only", action="store_true", help="only rebuild the summary from cached runs")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    global OURS
    OURS = args.ours
    if OURS is not None:
        sha = checkpoint_sha256("nino-ours") or "missing"
        for m in [m for m in LABELS if m.startswith("nino-ours")]:
            LABELS[m] = LABELS[m].replace("(ours, v6)", f"(ours, candidate {sha[:8]})")
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    (out / "runs").mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus", "device": "cpu",
            "torch": torch.__version__, "python": platform.python_version(),
            # the summary's command is only the latest invocation; each run record keeps its own
            "last_command": "python benchmarks/acceleration.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"), "ours_checkpoint": str(method_file("nino-ours")),
            "ours_sha256": checkpoint_sha256("nino-ours")}
    skipped = []
    if not args.summary_only:
        for task_name in args.tasks.split(","):
            task = get_task(task_name)
            data = load_task_data(task)
            steps = args.steps or task.steps
            for seed in [int(s) for s in args.seeds.split(",")]:
                for m in args.methods.split(","):
                    path = run_file(out, task.name, m, seed, steps)
                    if path.exists() and not args.force:
                        why = stale(json.loads(path.read_text()), task, m)
                        if why is None:
                            continue
                        print(f"rerun {path.name}: {why}", file=sys.stderr)
                    sha = checkpoint_sha256(m)
                    try:
                        nc, period = make_method(m, task.period)
                    except FileNotFoundError as e:
                        skipped.append(str(e))
                        print(f"skip: {e}", file=sys.stderr)
                        continue
                    rec = run_training(task, seed, method=m, nowcaster=nc, steps=steps, eval_every=args.eval_every,
                                       data=data, period=period, progress=not args.no_progress,
                                       guard=GUARDS.get(m), max_k=max_horizon(m), hold=HOLDS.get(m),
                                       min_k=MIN_KS.get(m, 1), gate=GATES.get(m),
                                       gate_every_cycle=m in GATE_EVERY)
                    rec.update(environment())
                    if checkpoint_sha256(m) != sha:  # replaced while it ran: the record would lie
                        print(f"not saved: {m}'s checkpoint file changed during the run", file=sys.stderr)
                        continue
                    rec["checkpoint_sha256"] = sha
                    rec["command"] = meta["last_command"]
                    path.write_text(json.dumps(rec))
                    print(f"{task.name} {m} seed {seed}: steps to target {rec['steps_to_target']}, "
                          f"final {rec['final_score']:.3f}, {rec['wall_time_s']:.0f} s", flush=True)
    meta["skipped"] = skipped
    summary = write_summary(out, meta)
    print((out / "acceleration.md").read_text())
    return 0 if summary["runs"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

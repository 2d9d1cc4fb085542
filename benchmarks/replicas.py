"""Symmetry replicas: how much of a training run's result is rounding?

A replica of a run starts from the same initial weights moved by a random element of the model's
inferred neuron permutation group (``run_training(permute=r)``). The network computes the same
function, AdamW is elementwise and the nowcasters act on a graph whose nodes are the neurons, so in
exact arithmetic a replica *is* the original run with its neurons relabelled: the same batches, the
same scores. In floating point its sums run in another order. The spread of a method's final scores
over replicas is therefore the part of a single-seed result that no method can control, and the
mean over replicas is that seed's result with the rounding averaged out.

Replica 0 is the unpermuted run (what ``benchmarks/acceleration.py`` measures, on this machine);
replica ``r >= 1`` uses the group element drawn from seed ``r``.

    python benchmarks/replicas.py --task austen-3-24-bpe --seed 0 --methods adamw,nino-ours --replicas 0,1,2,3

Writes one run record per (task, method, seed, replica) to ``benchmarks/results/replicas/runs/``
(cached: a record that exists is not rerun unless ``--force``) and ``replicas.md`` / ``replicas.json``
beside: per task, seed and method, the final score of every replica, their mean and range, the
steps to target, and for a nowcaster the gap of its replica mean to AdamW's replica mean.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from acceleration import (GUARDS, HOLDS, MIN_KS, checkpoint_sha256, environment, make_method,  # noqa: E402
                          max_horizon)
from nowcast.tasks import get_task, load_task_data  # noqa: E402
from nowcast.train import run_training  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "replicas"


def run_file(out: Path, task: str, method: str, seed: int, replica: int) -> Path:
    return out / "runs" / f"{task}__{method}__s{seed}__r{replica}.json"


def gap(metric: str, score: float, base: float) -> float:
    """A score against AdamW's: % of AdamW's perplexity, or accuracy points."""
    return 100 * (score / base - 1) if metric == "perplexity" else score - base


def summarise(out: Path) -> list[dict]:
    """One row per (task, seed, method) over the cached replica records."""
    groups: dict[tuple, list[dict]] = {}
    for p in sorted((out / "runs").glob("*.json")):
        r = json.loads(p.read_text())
        groups.setdefault((r["task"], r["seed"], r["method"]), []).append(r)
    rows = []
    for (task, seed, method), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["replica"])
        finals = [r["final_score"] for r in rs]
        row = {"task": task, "seed": seed, "method": method, "metric": rs[0]["metric"],
               "replicas": [r["replica"] for r in rs], "final_scores": [round(f, 3) for f in finals],
               "mean_final": round(statistics.fmean(finals), 3), "min_final": round(min(finals), 3),
               "max_final": round(max(finals), 3), "steps_to_target": [r["steps_to_target"] for r in rs]}
        base = groups.get((task, seed, "adamw"))
        if base and method != "adamw":
            base_mean = statistics.fmean(r["final_score"] for r in base)
            row["mean_vs_adamw_mean"] = round(gap(row["metric"], row["mean_final"], base_mean), 2)
            row["replicas_vs_adamw_mean"] = [round(gap(row["metric"], f, base_mean), 2) for f in finals]
        rows.append(row)
    return rows


def write_summary(out: Path) -> list[dict]:
    rows = summarise(out)
    (out / "replicas.json").write_text(json.dumps({"rows": rows}, indent=1))
    lines = ["| task | seed | method | replicas | final score per replica | mean (range) | "
             "replicas vs AdamW's mean | mean vs AdamW's mean | steps to target per replica |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        unit = "%" if r["metric"] == "perplexity" else " pt"
        per = " / ".join(f"{f:.2f}" for f in r["final_scores"])
        vs = " / ".join(f"{g:+.1f}{unit}" for g in r.get("replicas_vs_adamw_mean", []))
        mean_vs = f"{r['mean_vs_adamw_mean']:+.2f}{unit}" if "mean_vs_adamw_mean" in r else ""
        steps = " / ".join("not" if s is None else f"{s:,}" for s in r["steps_to_target"])
        span = f"{r['mean_final']:.2f} ({r['min_final']:.2f}-{r['max_final']:.2f})"
        lines.append(f"| {r['task']} | {r['seed']} | {r['method']} | {len(r['replicas'])} | {per} | "
                     f"{span} | {vs} | {mean_vs} | {steps} |")
    (out / "replicas.md").write_text("\n".join(lines) + "\n")
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="austen-3-24-bpe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="adamw,nino-ours", help="methods of benchmarks/acceleration.py")
    p.add_argument("--replicas", default="0,1,2,3", help="0: the unpermuted run; r >= 1: permutation seed r")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true", help="rerun cached records")
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        task = get_task(args.task)
        data = load_task_data(task)
        replicas = [int(r) for r in args.replicas.split(",")]
        if any(r < 0 for r in replicas):
            p.error("--replicas: 0 (unpermuted) or a permutation seed >= 1")
        command = "python benchmarks/replicas.py " + " ".join(argv if argv is not None else sys.argv[1:])
        for m in args.methods.split(","):
            nc, period = make_method(m, task.period)
            for r in replicas:
                path = run_file(args.out, task.name, m, args.seed, r)
                if path.exists() and not args.force:
                    continue
                rec = run_training(task, args.seed, method=m, nowcaster=nc, data=data, period=period,
                                   progress=not args.no_progress, max_k=max_horizon(m), permute=r or None,
                                   guard=GUARDS.get(m), hold=HOLDS.get(m), min_k=MIN_KS.get(m, 1))
                rec.update(environment(), replica=r, checkpoint_sha256=checkpoint_sha256(m), command=command)
                path.write_text(json.dumps(rec))
                print(f"{task.name} {m} seed {args.seed} replica {r}: final {rec['final_score']:.3f}, "
                      f"steps to target {rec['steps_to_target']}, {rec['wall_time_s']:.0f} s", flush=True)
    write_summary(args.out)
    print((args.out / "replicas.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

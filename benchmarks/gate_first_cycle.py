"""The skill gate's first decision on every benchmark task and seed (``nowcast.gate.SkillGate``).

The gate decides at the first nowcast from the run's first period alone, and every method's run is
AdamW until then, so the decision is a property of (task, seed, nowcaster): this script trains each
task for one period exactly as ``benchmarks/acceleration.py`` does (``run_training(steps=period,
gate=...)``: same model, batches, recording at half spacing) and writes the backtest skill of the
shipped checkpoint (or ``--checkpoint``) to ``benchmarks/results/gate/first_cycle.{json,md}``.

    python benchmarks/gate_first_cycle.py                    # every task, seeds 0,1,2
    python benchmarks/gate_first_cycle.py --tasks fm16 --seeds 0
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nowcast  # noqa: E402
from nowcast.tasks import TASKS, get_task, load_task_data  # noqa: E402
from nowcast.train import run_training  # noqa: E402
from acceleration import cpu_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

OUT = ROOT / "benchmarks" / "results" / "gate"


def first_skill(task, seed: int, nowcaster, data) -> float:
    """The gate's backtest skill at the first nowcast of ``task``/``seed`` (one period of AdamW)."""
    rec = run_training(task, seed, nowcaster=nowcaster, steps=task.period, eval_every=task.period, data=data,
                       progress=False, gate=1.0)
    skill = rec["gate_log"][0]["skill"]
    return float("inf") if skill is None else float(skill)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--checkpoint", default=None, help="a nowcaster file (default: the shipped checkpoint)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from nowcast.cli import SHIPPED_CHECKPOINT

    checkpoints = {"ours": SHIPPED_CHECKPOINT} if args.checkpoint is None else {
        Path(args.checkpoint).name: Path(args.checkpoint)}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "first_cycle.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    done = {(r["task"], r["seed"], r["checkpoint"]) for r in rows}
    for name in args.tasks.split(","):
        task = get_task(name)
        data = load_task_data(task)
        for seed in [int(s) for s in args.seeds.split(",")]:
            for label, ckpt in checkpoints.items():
                if (task.name, seed, label) in done:
                    continue
                s = first_skill(task, seed, nowcast.load(ckpt), data)
                rows.append({"task": task.name, "seed": seed, "checkpoint": label, "period": task.period,
                             "skill": s})
                print(f"{task.name} seed {seed} {label}: first-cycle skill {s:.4f}", flush=True)
                path.write_text(json.dumps({"rows": rows, "cpu": cpu_model(), "torch": torch.__version__,
                                            "torch_threads": args.threads,
                                            "command": "python benchmarks/gate_first_cycle.py " + " ".join(
                                                argv if argv is not None else sys.argv[1:])}, indent=1))
    write_table(rows, args.out / "first_cycle.md")
    return 0


def write_table(rows: list[dict], path: Path) -> None:
    """Task x seed table of first-cycle skill, one column per checkpoint."""
    labels = sorted({r["checkpoint"] for r in rows}, key=lambda c: c != "ours")
    by = {(r["task"], r["seed"], r["checkpoint"]): r["skill"] for r in rows}
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    seeds = sorted({r["seed"] for r in rows})
    lines = ["| task | " + " | ".join(f"{c} seed {s}" for c in labels for s in seeds) + " |",
             "|---|" + "---|" * (len(labels) * len(seeds))]
    for t in tasks:
        cells = [f"{by[(t, s, c)]:.3f}" if (t, s, c) in by else "" for c in labels for s in seeds]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())

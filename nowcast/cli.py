"""``nowcast`` command line: ``demo`` (AdamW vs AdamW + a nowcaster), ``train`` (one run), ``plot``
(validation curves of saved runs), ``tasks``.

``nowcast demo`` trains a task (FM/16 by default) twice from the same seed and batch stream, with
AdamW and with AdamW wrapped in NiNo and a nowcaster, prints steps to target and the reduction,
and writes a plot and the two runs' JSON to ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .shipped import SHIPPED_CHECKPOINT, SHIPPED_GATE

__all__ = ["main", "resolve_nowcaster", "NowcasterSpecError", "RunFileError", "SHIPPED_CHECKPOINT", "PUBLISHED_ENV"]

PACKAGE_DIR = Path(__file__).resolve().parent
PUBLISHED_ENV = "NOWCAST_PUBLISHED"
PUBLISHED_RELATIVE = Path("..") / "shared" / "reference" / "checkpoints" / "nino_no_posw.pt"
# when the default task's data is missing, the demo uses the first of these whose data is present
DEMO_FALLBACKS = ("fm16", "mnist16", "austen-3-24", "bible-3-24", "pydocs-3-24")


class NowcasterSpecError(ValueError):
    """``--nowcaster`` names nothing that can be loaded; the message says what to pass instead."""


def _published_candidates() -> list[Path]:
    env = os.environ.get(PUBLISHED_ENV)
    if env:
        return [Path(env)]
    repo = PACKAGE_DIR.parent
    return [repo / PUBLISHED_RELATIVE, Path.cwd() / PUBLISHED_RELATIVE]


def resolve_nowcaster(spec: str) -> Any:
    """Turn a ``--nowcaster`` value into a nowcaster.

    - ``default``: the checkpoint shipped in the package (``nowcast/checkpoints/nino_ours.safetensors``).
    - ``published``: the authors' ``nino_no_posw.pt``, from ``$NOWCAST_PUBLISHED`` or
      ``../shared/reference/checkpoints/nino_no_posw.pt`` beside the repository (or the working
      directory).
    - ``linefit`` / ``linefit+``: the untrained baselines.
    - ``no-change``: the null nowcast (the newest state), a control for the wrapper's own effect.
    - anything else: a path to a checkpoint ``nowcast.load`` reads.
    """
    import nowcast

    key = spec.strip().lower()
    if key == "default":  # the bare checkpoint: run_training wraps it in the gate that --gate asks for
        try:
            return nowcast.shipped(gate=None)
        except FileNotFoundError as exc:
            raise NowcasterSpecError(f"{exc}; or pass --nowcaster published (the authors' nino_no_posw.pt), "
                                     "linefit, or a checkpoint path") from None
    if key == "published":
        for path in _published_candidates():
            if path.is_file():
                return nowcast.load(path)
        looked = ", ".join(str(p) for p in _published_candidates())
        raise NowcasterSpecError(f"the published checkpoint nino_no_posw.pt was not found (looked in: {looked}); "
                                 f"set {PUBLISHED_ENV}=/path/to/nino_no_posw.pt or pass the path to --nowcaster")
    if key == "linefit":
        return nowcast.Linefit()
    if key in ("linefit+", "linefitplus", "linefit-plus"):
        return nowcast.LinefitPlus()
    if key in ("no-change", "nochange"):
        return nowcast.NoChange()
    path = Path(spec).expanduser()
    if not path.exists():
        raise NowcasterSpecError(f"--nowcaster {spec!r}: no such file; pass default, published, linefit, "
                                 "linefit+, no-change or the path of a checkpoint")
    try:
        return nowcast.load(path)
    except (nowcast.CheckpointError, OSError) as e:
        raise NowcasterSpecError(f"--nowcaster {spec!r}: {e}") from e


# ---- helpers ---------------------------------------------------------------------------------------
def _period(args: argparse.Namespace) -> Any:
    if getattr(args, "dynamic_period", False):
        from .schedule import DynamicPeriod

        return DynamicPeriod()
    return args.period


def _fmt_score(task: Any, v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}%" if task.metric == "accuracy" else f"{v:.3f}"


def _reduction(base: Optional[int], other: Optional[int]) -> Optional[float]:
    if base is None or other is None or base <= 0:
        return None
    return 100.0 * (1.0 - other / base)


def _load_demo_data(args: argparse.Namespace, explicit_task: bool) -> tuple[Any, Any, Optional[str]]:
    """(task, data, note): the requested task, or, when its data is missing and the task was not
    given explicitly, the first fallback task whose data is present."""
    from .data import DataMissingError
    from .tasks import get_task, load_task_data

    first = get_task(args.task)
    try:
        return first, load_task_data(first, root=args.data_dir), None
    except DataMissingError as e:
        if explicit_task:
            raise
        first_error = e
    for name in DEMO_FALLBACKS:
        if name == first.name:
            continue
        try:
            task = get_task(name)
            data = load_task_data(task, root=args.data_dir)
        except DataMissingError:
            continue
        return task, data, (f"{first.dataset} data is missing, so the demo runs {task.name} ({task.dataset}), "
                            f"the smallest task whose data is present. Fetch all data with "
                            f"`bash scripts/fetch_data.sh`.")
    raise first_error


def _plot(task: Any, runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for r in runs:
        ax.plot(r["eval_steps"], r["scores"], label=r["method"], lw=1.4)
        if r["steps_to_target"] is not None:
            ax.axvline(r["steps_to_target"], ls=":", lw=1, color=ax.lines[-1].get_color())
    ax.axhline(task.target, color="grey", ls="--", lw=1, label=f"target {task.target:g}")
    ax.set_xlabel("training step")
    if task.metric == "accuracy":
        ax.set_ylabel("validation accuracy (%)")
        lo = min(min(r["scores"][1:] or r["scores"]) for r in runs)  # step 0 is chance level: leave it out
        hi = max(max(r["scores"]) for r in runs)
        ax.set_ylim(max(0.0, min(lo, task.target) - 2), min(100.0, max(hi, task.target) + 1))
    else:
        ax.set_ylabel("validation perplexity")
        ax.set_yscale("log")
    ax.set_title(f"{task.name}: seed {runs[0]['seed']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- subcommands -----------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace, explicit_task: bool) -> int:
    from .tasks import get_task
    from .train import run_training

    get_task(args.task)  # unknown task names fail first
    nowcaster = resolve_nowcaster(args.nowcaster)  # fail fast, before any training
    task, data, note = _load_demo_data(args, explicit_task)
    if note:
        print(f"nowcast demo: {note}", file=sys.stderr)
    steps = args.steps or task.steps
    eval_every = args.eval_every or min(task.eval_every, max(1, steps // 20))
    common = dict(steps=steps, eval_every=eval_every, data=data, progress=not args.no_progress)
    base = run_training(task, args.seed, method="adamw", **common)
    named = args.nowcaster in ("default", "published", "linefit", "linefit+", "no-change")
    label = f"adamw+{args.nowcaster if named else type(nowcaster).__name__}"
    nino = run_training(task, args.seed, method=label, nowcaster=nowcaster, period=_period(args), ctx=args.ctx,
                        guard=args.guard, hold=args.hold, gate=gate_for(args), **common)
    red = _reduction(base["steps_to_target"], nino["steps_to_target"])
    summary = {"task": task.name, "seed": args.seed, "steps": steps, "target": task.target, "metric": task.metric,
               "target_note": task.target_note, "nowcaster": args.nowcaster, "fallback_note": note,
               "reduction_pct": red, "runs": [base, nino]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{task.name}_seed{args.seed}.json"
    png_path = out / f"{task.name}_seed{args.seed}.png"
    json_path.write_text(json.dumps(summary, indent=1))
    _plot(task, [base, nino], png_path)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "runs"} |
                         {"runs": [{k: r[k] for k in ("method", "steps_to_target", "final_score", "wall_time_s",
                                                      "nowcasts", "nowcasts_rejected")} for r in (base, nino)],
                          "json": str(json_path), "plot": str(png_path)}, indent=1))
        return 0
    print(f"\n{task.name} ({task.dataset}), seed {args.seed}, {steps} steps, target {task.metric} "
          f"{'>=' if task.higher_is_better() else '<='} {task.target:g}")
    rows = [("method", "steps to target", f"final {task.metric}", "wall time", "nowcasts")]
    for r in (base, nino):
        stt = str(r["steps_to_target"]) if r["steps_to_target"] is not None else f"not reached in {steps}"
        rows.append((r["method"], stt, _fmt_score(task, r["final_score"]), f"{r['wall_time_s']:.1f} s",
                     str(r["nowcasts"]) + (f" ({r['nowcasts_rejected']} rejected)" if r["nowcasts_rejected"] else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for j, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    if nino.get("gate_log"):
        first = nino["gate_log"][0]
        verdict = ("open: the nowcasts ran" if first["open"] else
                   "closed: no nowcast changed the parameters (the checkpoint shows no skill on this run)")
        skill = "n/a (nothing moved)" if first["skill"] is None else f"{first['skill']:.3f}"
        print(f"skill gate {nino['gate']:g} (--gate none turns it off): backtest error {skill} times no "
              f"change's at the first nowcast, {verdict}")
    if red is not None:
        print(f"reduction in steps to target: {red:.1f}%")
    elif base["steps_to_target"] is None:
        print(f"reduction: n/a (AdamW did not reach the target in {steps} steps; the full budget is "
              f"{task.steps})")
    else:
        print("reduction: n/a (the nowcast run did not reach the target)")
    print(f"plot: {png_path}\nruns: {json_path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .tasks import get_task
    from .train import run_training

    task = get_task(args.task)
    if args.lr is not None:
        task = dataclasses.replace(task, lr=args.lr)
    nowcaster = resolve_nowcaster(args.nowcaster) if args.nowcaster else None
    record = run_training(task, args.seed, method=args.method or "adamw",
                          nowcaster=nowcaster, steps=args.steps, eval_every=args.eval_every,
                          period=_period(args), ctx=args.ctx, progress=not args.no_progress, log=args.log,
                          guard=args.guard if nowcaster is not None else None, hold=args.hold,
                          gate=gate_for(args) if nowcaster is not None else None)
    text = json.dumps(record, indent=1)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        _plot(task, [record], Path(args.plot))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    if args.json or not args.out:
        print(text)
    else:
        print(f"{task.name} seed {args.seed} {record['method']}: steps to target {record['steps_to_target']}, "
              f"final {task.metric} {record['final_score']:.4g}, {record['wall_time_s']:.1f} s -> {args.out}")
    if args.plot and not args.json:
        print(f"plot: {args.plot}", file=sys.stderr if not args.out else sys.stdout)
    return 0


class RunFileError(ValueError):
    """A file given to ``nowcast plot`` is not a run record; the message names the file."""


def _read_runs(paths: Sequence[str]) -> list[tuple[str, dict]]:
    """(file, run record) for every run in the files: ``nowcast train`` records or ``nowcast demo`` summaries."""
    runs: list[tuple[str, dict]] = []
    for name in paths:
        path = Path(name)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise RunFileError(f"{name}: no such file") from None
        except json.JSONDecodeError as e:
            raise RunFileError(f"{name}: not JSON ({e})") from None
        records = data.get("runs") if isinstance(data, dict) and "runs" in data else [data]
        for r in records:
            if not isinstance(r, dict) or not {"task", "eval_steps", "scores", "method"} <= set(r):
                raise RunFileError(f"{name}: not a run record (expected the JSON written by `nowcast train --out` "
                                   "or `nowcast demo`)")
            runs.append((name, r))
    return runs


def cmd_plot(args: argparse.Namespace) -> int:
    from .tasks import get_task

    runs = _read_runs(args.runs)
    tasks = sorted({r["task"] for _, r in runs})
    if len(tasks) != 1:
        raise RunFileError(f"the runs belong to several tasks {tasks}; plot one task at a time")
    task = get_task(tasks[0])
    seeds = {r.get("seed") for _, r in runs}
    shown = [dict(r, method=f"{r['method']} seed {r.get('seed')}" if len(seeds) > 1 else r["method"])
             for _, r in runs]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _plot(task, shown, out)
    rows = [{"file": f, "method": r["method"], "seed": r.get("seed"), "steps": r.get("steps"),
             "steps_to_target": r.get("steps_to_target"), "final_score": r["scores"][-1] if r["scores"] else None}
            for f, r in runs]
    if args.json:
        print(json.dumps({"task": task.name, "metric": task.metric, "target": task.target, "plot": str(out),
                          "runs": rows}, indent=1))
        return 0
    for row in rows:
        stt = row["steps_to_target"] if row["steps_to_target"] is not None else "not reached"
        print(f"{row['method']} seed {row['seed']}: steps to target {stt}, final {task.metric} "
              f"{_fmt_score(task, row['final_score'])}")
    print(f"plot: {out}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from .tasks import TASKS, build_model, num_params

    rows = []
    for t in TASKS.values():
        d = t.to_dict()
        d["num_params"] = num_params(build_model(t, 0)) if args.params or args.json else None
        rows.append(d)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    head = ("name", "kind", "dataset", "steps", "period", "lr", "batch", "metric", "target", "params", "target from")
    table = [head] + [(r["name"], r["kind"], r["dataset"], str(r["steps"]), str(r["period"]), f"{r['lr']:g}",
                       str(r["batch_size"]),
                       r["metric"], f"{r['target']:g}", "-" if r["num_params"] is None else f"{r['num_params']:,}",
                       r["target_note"].split(":")[0]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for j, row in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    return 0


# ---- argument parsing ------------------------------------------------------------------------------
def _hold_arg(text: str) -> Optional[str]:
    if text == "none":
        return None
    from .optim import _HOLD_SETS  # the one list of hold sets NiNo accepts

    if text != "auto" and not all(k in _HOLD_SETS for k in text.split("+")):
        raise argparse.ArgumentTypeError(f"{text!r}: use auto, none, or a '+'-joined set of norms, embeddings, "
                                         "vectors (e.g. norms+embeddings)")
    return text


def _gate_arg(text: str) -> Union[float, str, None]:
    key = text.strip().lower()
    if key == "none":
        return None
    if key == "shipped":  # the default: resolved by gate_for once the nowcaster is known
        return key
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the gate is a ratio in (0, 1], e.g. 0.9 (nowcast only when "
                                         "the nowcaster's backtest error is under 0.9 times no change's), "
                                         "or none")
    return value


def gate_for(args: argparse.Namespace) -> Optional[float]:
    """The ``--gate`` value in force: an explicit ratio or none, else the shipped default's gate for the
    shipped nowcaster and no gate for any other."""
    if args.gate != "shipped":
        return args.gate
    return SHIPPED_GATE if (args.nowcaster or "").strip().lower() == "default" else None


def _add_nowcast_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--period", type=int, default=None,
                   help="steps per nowcast cycle, a multiple of --ctx (default: the task's, 1000 for fm16)")
    p.add_argument("--dynamic-period", action="store_true",
                   help="nowcast often early and rarely late (nowcast.schedule.DynamicPeriod defaults)")
    p.add_argument("--ctx", type=int, default=5, help="parameter states per nowcast (default 5)")
    p.add_argument("--guard", type=float, default=None, metavar="FACTOR",
                   help="undo a nowcast whose training loss on its step's batch exceeds FACTOR times the loss "
                        "before it, and take AdamW's step on that batch instead (1.0: any increase; default: "
                        "no check)")
    p.add_argument("--hold", type=_hold_arg, default=None, metavar="PARTS",
                   help="parameters a nowcast leaves to the base optimizer: none (default), auto (biases and "
                        "norm parameters of models with normalisation layers, nothing otherwise), or a "
                        "'+'-joined set of norms, embeddings, vectors")
    p.add_argument("--gate", type=_gate_arg, default="shipped", metavar="RATIO",
                   help="skill gate (nowcast.gate.SkillGate): nowcast only when the nowcaster, backtested on "
                        "the run's first cycle, beats no change by this error ratio (e.g. 0.9); records "
                        f"twice the states. none: no gate. Default: {SHIPPED_GATE} for the shipped "
                        "nowcaster (--nowcaster default), no gate for any other")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is often faster on a busy machine)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nowcast", description="Accelerate training with neural nowcasting.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,train,plot,tasks}")

    p = sub.add_parser("demo", help="AdamW vs AdamW + a nowcaster on one task: steps to target, plot",
                       description="Train a task with AdamW and with AdamW + a nowcaster (same seed, same "
                                   "batches), print steps to target and the reduction, save a plot and JSON.")
    p.add_argument("--task", default=None, help="task name (default fm16; see `nowcast tasks`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the task's budget)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: the task's)")
    p.add_argument("--nowcaster", default="default",
                   help="default (shipped checkpoint), published (nino_no_posw.pt), linefit, linefit+, "
                        "no-change (a control), or a path")
    p.add_argument("--out", default="runs/demo", help="directory for the plot and JSON (default runs/demo)")
    p.add_argument("--data-dir", default=None, help="data directory (default $NOWCAST_DATA or <repo>/data)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_nowcast_options(p)

    p = sub.add_parser("train", help="one training run of a task; JSON record",
                       description="Train one task with AdamW (optionally + a nowcaster) and write the run's "
                                   "JSON record (scores at every evaluation, steps to target, wall time).")
    p.add_argument("--task", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="override the task's AdamW learning rate (tuning)")
    p.add_argument("--nowcaster", default=None, help="as for demo; omitted: AdamW alone")
    p.add_argument("--method", default=None, help="label stored in the record")
    p.add_argument("--out", default=None, help="write the JSON record here (default: print it)")
    p.add_argument("--log", default=None, help="append one JSON line per evaluation to this file")
    p.add_argument("--plot", default=None, metavar="PNG", help="also save the validation curve as a PNG")
    p.add_argument("--json", action="store_true", help="also print the record")
    p.add_argument("--no-progress", action="store_true")
    _add_nowcast_options(p)

    p = sub.add_parser("plot", help="validation curves of saved runs (PNG)",
                       description="Plot the validation curves of runs saved by `nowcast train --out` or "
                                   "`nowcast demo` (one task; several files, methods and seeds on one figure).")
    p.add_argument("runs", nargs="+", metavar="RUN.json", help="run records or demo summaries")
    p.add_argument("--out", default="runs/plot.png", help="PNG to write (default runs/plot.png)")
    p.add_argument("--json", action="store_true", help="print a JSON summary of the runs and the plot path")

    p = sub.add_parser("tasks", help="list the task registry", description="List the registered tasks.")
    p.add_argument("--json", action="store_true", help="JSON, with parameter counts")
    p.add_argument("--params", action="store_true", help="also count parameters (builds each model)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .data import DataMissingError
    from .tasks import UnknownTaskError

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        if args.command == "demo":
            explicit = args.task is not None
            if args.task is None:
                args.task = "fm16"
            return cmd_demo(args, explicit)
        if args.command == "train":
            return cmd_train(args)
        if args.command == "plot":
            return cmd_plot(args)
        return cmd_tasks(args)
    except (DataMissingError, NowcasterSpecError, UnknownTaskError, RunFileError) as e:
        print(f"nowcast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

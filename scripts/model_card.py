"""Write nowcast/checkpoints/MODEL_CARD.md (and docs/model_card_loss.png) from a meta-training run.

Called by ``bash scripts/make_checkpoint.sh train``; everything in the card is read from the files
that run and the trajectory store wrote, nothing is typed in by hand.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "nowcast" / "checkpoints"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def describe(task: str) -> str:
    """One line on a registered task: dataset, network, optimizer settings."""
    from nowcast.tasks import get_task
    t = get_task(task)
    if t.kind == "vision":
        return f"{t.dataset}, the paper's FM/{t.arch['channels']} network, AdamW lr {t.lr}, batch {t.batch_size}"
    a = t.arch
    return (f"{t.dataset} {a['tokenizer']}-level, {a['family']} {a['layers']} layers x {a['d_model']}, "
            f"{a['heads']} heads, context {a['context']}, AdamW lr {t.lr}, batch {t.batch_size}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--traj", type=Path, nargs="+", required=True, help="the trajectory stores (<root>/fm16 ...)")
    p.add_argument("--run", type=Path, required=True, help="the meta-training output directory")
    p.add_argument("--max-runs", type=int, default=None, help="runs used per store (default: all)")
    args = p.parse_args()
    metas = [json.loads((t / "meta.json").read_text()) for t in args.traj]
    cfg = json.loads((args.run / "config.json").read_text())
    summary = json.loads((args.run / "summary.json").read_text())
    log = [json.loads(x) for x in (args.run / "log.jsonl").read_text().splitlines() if x.strip()]
    sec = sum(r.get("sec", 0.0) for r in log)
    vals = [(r["step"], r["val_loss"]) for r in log if r.get("val_loss") is not None]
    meta = metas[0]
    per_store = [m["runs"] if args.max_runs is None else min(args.max_runs, m["runs"]) for m in metas]
    n_used = sum(per_store)
    seeds, lrs, done, coll_s, wall = [], [], [], 0.0, 0.0
    for m, n in zip(metas, per_store):
        seeds += (m.get("seeds") or list(range(m["runs"])))[:n]
        lrs += (m.get("lrs") or [None] * m["runs"])[:n]
        done += m["done"][:n]
        coll_s += sum(m.get("group_wall_s", [])[:n])
        wall += m.get("wall_s") or 0.0
    weights, config = CKPT / "nino_ours.safetensors", CKPT / "nino_ours.json"
    if (args.run / "loss.png").exists():
        shutil.copyfile(args.run / "loss.png", ROOT / "docs" / "model_card_loss.png")
    c = cfg.get("config", cfg)
    n_val = sum(max(1, round(c.get("val_fraction", 0.1) * n)) if n > 1 else 0 for n in per_store)
    period = c.get("period", 1000)
    periods = ", ".join(f"{p} ({m['task']})" for p, m in zip(period, metas)) if isinstance(period, list) else period
    spacing = ", ".join(str(p // 5) for p in period) if isinstance(period, list) else period // 5
    lines = [
        "# Model card: `nino_ours` (the nowcaster shipped with neural-nowcasting)",
        "",
        "A NiNo graph neural network (`nowcast.NiNoGNN`, the published architecture: hidden 128, 3 message-passing",
        "layers, MLP head over 40 horizons, ctx 5, LPE 8) trained by this project's own pipeline. Loaded by",
        "`nowcast demo` and `resolve_nowcaster('default')`.",
        "",
        "## Files",
        f"- `nino_ours.safetensors`: {weights.stat().st_size:,} bytes, SHA-256 `{sha256(weights)}`",
        f"- `nino_ours.json`: SHA-256 `{sha256(config)}`",
        f"- weights: {summary.get('weights', 0):,}",
        "",
        "## Data",
        "- Collected with `bash scripts/make_checkpoint.sh collect`: runs trained with `torch.optim.AdamW` (the task's",
        "  settings, learning rate jittered per run), parameters saved every few steps over each task's budget.",
        *[f"- `{t}`: task `{m['task']}` ({describe(m['task'])}), {n} runs (seeds {(m.get('seeds') or list(range(m['runs'])))[:n]}, "
          f"learning rates {[round(x, 5) if x else None for x in (m.get('lrs') or [None] * m['runs'])[:n]]}), saved every "
          f"{m['save_every']} steps over {m['steps']:,} steps; saves complete per run at training time "
          f"{m['done'][:n]} of {m['n_saves']}."
          for t, m, n in zip(args.traj, metas, per_store)],
        f"- {n_used} runs in all; the last run of each store, {n_val} in all, held out for validation.",
        "- The benchmark seeds (0, 1, 2) are not among the meta-training seeds.",
        "",
        "## Training",
        f"- `bash scripts/make_checkpoint.sh train`: {c.get('steps')} AdamW steps, {c.get('batch')} windows per step "
        f"({c.get('per_run')} consecutive windows per sampled run), lr {c.get('lr')} cosine to {c.get('min_lr')}, "
        f"weight decay {c.get('weight_decay')}, gradient clip {c.get('clip')}, period {periods} "
        f"(states {spacing} steps apart), masked L1 in scaled space over horizons 1..40, "
        f"LPE sign flips {'on' if c.get('lpe_flip') else 'off'}, seed {c.get('seed')}.",
        f"- Final train loss {summary['train_loss']:.5f} (mean of the last 100 steps), validation loss "
        f"{summary['val_loss']:.5f} (step {summary['val_step']}); {summary['skipped_steps']} skipped steps.",
        f"- Validation curve: {', '.join(f'{s}: {v:.4f}' for s, v in vals)}.",
        "- Loss curves: `docs/model_card_loss.png`.",
        "",
        "## Compute",
        f"- Collection: {round(coll_s)} s wall for the {n_used} runs "
        f"used ({round(wall)} s for the whole stores so far), CPU, {meta['machine'].get('cpu_count')} cores, "
        f"{meta['machine'].get('torch_threads')} torch thread, a machine shared with other jobs.",
        f"- Meta-training: {sec:,.0f} s of step time, CPU ({platform.machine()}), one thread.",
        "",
        "## Limits",
        f"- Meta-trained on a handful of trajectories of {len(metas)} task(s) only, on a CPU budget far below the published model's",
        "  (trajectories of several tasks, 20,000 steps of 16 windows; docs/metatrain.md). The step-0 validation",
        "  loss above is the untrained network's (its predicted changes are near zero: about the no-change",
        "  baseline). Its acceleration is measured in `benchmarks/results/acceleration/` in the same runs as the",
        "  published checkpoint.",
        *([] if any(m["task"] != "fm16" and not m["task"].startswith(("fm", "mnist")) for m in metas) else [
            "- No language model in its meta-training data: on byte-level GPT-2-style models its nowcasts overshoot",
            "  (bible-3-24 seed 0: final perplexity 5.50 against AdamW's 4.89, benchmarks/results/acceleration/runs/).",
            "  For language models use the published checkpoint or the mixed recipe measured in",
            "  `benchmarks/results/candidates/v3/`."]),
    ]
    (CKPT / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {CKPT / 'MODEL_CARD.md'}")


if __name__ == "__main__":
    main()

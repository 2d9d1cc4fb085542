"""Which parameters does a nowcast help or hurt? Nowcast one part of the model, hold the rest.

A diagnostic beside the acceleration benchmark: the same training run as its ``nino-ours`` method
(``nowcast.train.run_training``, same weights, batches, period and horizons), except that at every
nowcast the parameters of the held part keep their newest state (as under the ``no-change``
control) while the rest take the shipped nowcaster's prediction. Comparing the final scores of the
held variants with ``adamw``, ``no-change`` and ``nino-ours`` on the same seed locates the damage.

Parts (``--hold``):
- ``token-embedding``: the model's input embedding (``get_input_embeddings()``; tied to the output
  head in the GPT-2-style tasks), so only the rest is nowcast;
- ``body``: everything except the token embedding (position embeddings included), so only the token
  embedding is nowcast;
- ``vectors``: every 1-D parameter (biases, LayerNorm gains and shifts);
- ``matrices``: every parameter with 2 or more dimensions;
- ``final-nowcast``: every parameter, at the run's last nowcast only (with the constant period the
  last nowcast falls on the last step, horizon k=1, so the final score is read with no AdamW step
  after it); every earlier nowcast is the full prediction;
- ``from-nowcast:N``: every parameter, at the run's N-th nowcast and every later one (1-based; on
  austen-3-24-bpe the 8th is step 799, k=5), so the run stops nowcasting there;
- ``match:REGEX``: every parameter whose ``named_parameters()`` name matches ``REGEX``
  (``re.search``), e.g. ``match:ln_f`` for the final LayerNorm of the GPT-2-style tasks;
- ``unused-tokens``: the token rows the training split never uses (a language model only). Unlike
  the other parts these rows also leave the GNN's input: it runs on the graph of the same model at
  the vocabulary the data uses (``nowcast.metatrain.vocab_columns`` picks those entries), so they do
  not enter the mean aggregation at the embedding neurons either.

    python benchmarks/partial_nowcast.py --task austen-3-24-bpe --seed 0 --hold token-embedding,body

Writes one run record per (task, hold, seed) to ``benchmarks/results/partial_nowcast/`` (the
``run_training`` record plus ``hold`` and the count of held values) and a Markdown summary beside.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import nowcast  # noqa: E402
from acceleration import OUT as ACCELERATION_OUT  # noqa: E402
from acceleration import run_file  # noqa: E402
from nowcast.cli import SHIPPED_CHECKPOINT  # noqa: E402
from nowcast.tasks import build_model, get_task  # noqa: E402
from nowcast.train import run_training  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "partial_nowcast"
PARTS = ("token-embedding", "body", "vectors", "matrices", "final-nowcast", "unused-tokens")


def held_mask(model: torch.nn.Module, hold: str) -> torch.Tensor:
    """Bool over the flat parameter vector (``named_parameters()`` order): True where held."""
    if hold.startswith("match:"):
        pattern = re.compile(hold[len("match:"):])
        mask = torch.cat([torch.full((p.numel(),), bool(pattern.search(n))) for n, p in model.named_parameters()])
        if not mask.any():
            raise ValueError(f"--hold {hold}: no parameter name matches; names look like "
                             f"{', '.join(n for n, _ in list(model.named_parameters())[:3])}")
        return mask
    if hold.startswith("from-nowcast:"):
        n = hold.split(":", 1)[1]
        if not (n.isdigit() and int(n) >= 1):
            raise ValueError(f"--hold {hold}: N must be a nowcast number >= 1, e.g. from-nowcast:8")
    elif hold not in PARTS:
        raise ValueError(f"unknown part {hold!r}; choose from {', '.join(PARTS)} or match:REGEX")
    if hold == "unused-tokens":
        raise ValueError("unused-tokens depends on the data: use used_vocab_nowcaster")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if hold in ("token-embedding", "body") and emb is None:
        raise ValueError(f"--hold {hold} needs a model with get_input_embeddings() (the language-model tasks)")
    parts = []
    for _, p in model.named_parameters():
        is_emb = emb is not None and p is emb.weight
        held = {"token-embedding": is_emb, "body": not is_emb, "vectors": p.dim() == 1,
                "matrices": p.dim() >= 2, "final-nowcast": True, "from-nowcast": True}[hold.split(":")[0]]
        parts.append(torch.full((p.numel(),), held))
    return torch.cat(parts)


class HeldNowcaster:
    """``base``'s prediction with the entries under ``mask`` replaced by their newest state.

    ``only_call`` (1-based) holds them at that nowcast of the run only; ``from_call`` at that one and
    every later one; None for both holds them at every one.
    """

    def __init__(self, base: Any, mask: torch.Tensor, only_call: Optional[int] = None,
                 from_call: Optional[int] = None) -> None:
        self.base, self.mask, self.only_call, self.from_call, self.calls = base, mask, only_call, from_call, 0
        self.needs_graph, self.ctx = base.needs_graph, base.ctx
        self.max_horizon = getattr(base, "max_horizon", 40)

    def predict(self, graph: Any, states: torch.Tensor, k: int) -> torch.Tensor:
        self.calls += 1
        if (self.only_call is not None and self.calls != self.only_call) or (
                self.from_call is not None and self.calls < self.from_call):
            return self.base.predict(graph, states, k)
        pred = self.base.predict(graph, states, k).clone()
        pred[self.mask] = states[self.mask, -1].to(pred.dtype)
        return pred

    def parameters(self):
        return self.base.parameters()


class UsedVocabNowcaster:
    """``base`` on ``graph`` (the model at a smaller vocabulary) for the flat entries ``columns``;
    every other entry keeps its newest state."""

    needs_graph = False  # it brings its own graph; the wrapper need not compile the full one

    def __init__(self, base: Any, graph: Any, columns: torch.Tensor) -> None:
        self.base, self.graph, self.columns = base, graph, columns
        self.ctx, self.max_horizon = base.ctx, getattr(base, "max_horizon", 40)

    def predict(self, graph: Any, states: torch.Tensor, k: int) -> torch.Tensor:
        pred = states[:, -1].clone()
        pred[self.columns] = self.base.predict(self.graph, states[self.columns], k).to(pred.dtype)
        return pred

    def parameters(self):
        return self.base.parameters()


def used_vocab_nowcaster(task_name: str, base: Any) -> tuple[UsedVocabNowcaster, torch.Tensor]:
    """(nowcaster, held mask) for ``unused-tokens``: ``base`` on the graph of the task's model at the
    token ids its training split uses."""
    from nowcast.metatrain import compile_at_rows
    from nowcast.tasks import load_task_data

    task = get_task(task_name)
    if task.kind == "vision" or task.arch.get("vocab") is None:
        raise ValueError(f"--hold unused-tokens needs a language-model task; {task_name} has no vocabulary")
    graph, _ir, columns = compile_at_rows(task_name, torch.unique(load_task_data(task).train_x).numpy())
    columns = torch.as_tensor(columns)
    mask = torch.ones(sum(p.numel() for p in build_model(task, seed=0).parameters()), dtype=torch.bool)
    mask[columns] = False
    return UsedVocabNowcaster(base, graph, columns), mask


def run(task_name: str, seed: int, hold: str, out: Path) -> dict:
    task = get_task(task_name)
    # the constant-period schedule nowcasts at steps period-1, 2*period-1, ...: steps // period in all
    only = task.steps // task.period if hold == "final-nowcast" else None
    if hold == "unused-tokens":
        held, mask = used_vocab_nowcaster(task_name, nowcast.load(SHIPPED_CHECKPOINT))
    else:
        mask = held_mask(build_model(task, seed), hold)
        start = int(hold.split(":")[1]) if hold.startswith("from-nowcast:") else None
        held = HeldNowcaster(nowcast.load(SHIPPED_CHECKPOINT), mask, only_call=only, from_call=start)
    rec = run_training(task, seed, method=f"nino-ours-hold-{hold}", nowcaster=held, progress=False)
    if only is not None and held.calls != only:  # type: ignore[union-attr]
        raise RuntimeError(f"expected {only} nowcasts, the run made {held.calls}")
    rec.update(hold=hold, held_values=int(mask.sum()), num_values=mask.numel(),
               command=f"python benchmarks/partial_nowcast.py --task {task_name} --seed {seed} --hold {hold}")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{task_name}__hold-{re.sub(r'[^A-Za-z0-9_.+-]', '_', hold)}__s{seed}.json").write_text(json.dumps(rec, indent=1))
    return rec


def _reference(task: str, method: str, seed: int, steps: int) -> dict | None:
    """The acceleration benchmark's cached run of ``method`` on the same task and seed, if any."""
    f = run_file(ACCELERATION_OUT, task, method, seed, steps)
    return json.loads(f.read_text()) if f.is_file() else None


def summary(out: Path) -> str:
    """Markdown table of every record under ``out``, with AdamW, no-change and nino-ours beside."""
    rows = ["| task | seed | run | steps to target | final score | final vs AdamW |", "|---|---|---|---|---|---|"]
    groups: dict[tuple[str, int, int], list[dict]] = {}
    for f in sorted(out.glob("*__hold-*__s*.json")):
        r = json.loads(f.read_text())
        groups.setdefault((r["task"], r["seed"], r["steps"]), []).append(r)
    for (task, seed, steps), recs in groups.items():
        refs = [(m, _reference(task, m, seed, steps)) for m in ("adamw", "no-change", "nino-ours")]
        adamw = refs[0][1]
        lines = [(m, r) for m, r in refs if r is not None]
        lines += [(f"hold {r['hold']} ({r['held_values']:,} of {r['num_values']:,} values)", r) for r in recs]
        for label, r in lines:
            vs = ""
            if adamw is not None:
                d = r["final_score"] - adamw["final_score"]
                vs = f"{d:+.2f}" if r["metric"] == "accuracy" else f"{100 * d / adamw['final_score']:+.1f}%"
            reached = r["steps_to_target"] if r["steps_to_target"] is not None else "not reached"
            rows.append(f"| {task} | {seed} | {label} | {reached} | {r['final_score']:.2f} | {vs} |")
    text = "\n".join(rows) + "\n"
    (out / "partial_nowcast.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hold", required=True,
                    help=f"comma-separated parts: {', '.join(PARTS)}, from-nowcast:N, match:REGEX")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the benchmark)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for hold in args.hold.split(","):
        rec = run(args.task, args.seed, hold, args.out)
        print(f"{args.task} seed {args.seed} hold {hold}: final {rec['final_score']:.2f}, "
              f"steps to target {rec['steps_to_target']}", flush=True)
    print(summary(args.out))


if __name__ == "__main__":
    main()

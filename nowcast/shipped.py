"""The nowcaster shipped in the package, as it is used by default: checkpoint v6 behind a skill gate.

The checkpoint alone (``gate=None``) helps the vision nets and does nothing useful on language
models, where on GPT-2 BPE its long jumps cost up to 4% final perplexity on a seed (README, Known
limits). :class:`~nowcast.gate.SkillGate` at ``SHIPPED_GATE`` backtests it on the run's own first
cycle and turns nowcasting off where it predicts no better than "no change": measured on every
benchmark task and seed, it opens on the vision nets (backtest 0.79-0.88, MNIST/32 seed 2 at
0.913 excepted) and closes on every language model (0.992-1.011)
(``benchmarks/results/gate/first_cycle.md``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .base import Nowcaster

__all__ = ["SHIPPED_CHECKPOINT", "SHIPPED_GATE", "shipped"]

SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "nino_ours.safetensors"
#: the skill-gate threshold used by default (fixed before the per-task scan; see the gate's README)
SHIPPED_GATE = 0.9


def shipped(gate: Optional[float] = SHIPPED_GATE, map_location: str = "cpu") -> Nowcaster:
    """The shipped nowcaster: the package checkpoint wrapped in ``SkillGate(threshold=gate)``.

    ``gate=None`` gives the bare checkpoint (``ctx=5``). The gated one has ``ctx=10`` (it records
    twice the states); :class:`nowcast.NiNo` takes its ``ctx`` from the nowcaster when none is given.
    """
    from .checkpoint import load
    from .gate import SkillGate

    if not SHIPPED_CHECKPOINT.is_file():
        raise FileNotFoundError(f"no shipped checkpoint is installed ({SHIPPED_CHECKPOINT} does not exist); "
                                "reinstall the package, or load another checkpoint with nowcast.load(path)")
    model = load(SHIPPED_CHECKPOINT, map_location=map_location)
    return model if gate is None else SkillGate(model, gate)

"""When to record states, when to nowcast, and which horizon ``k`` to ask for.

Training is cut into *cycles*. Cycle ``j`` starts at step ``S_j`` (``S_0 = 0``) and is ``P_j`` steps
long, ``P_j`` a multiple of ``ctx``; ``S_{j+1} = S_j + P_j``. Steps are counted from 0 (the
``s``-th call of ``optimizer.step()``). With ``I_j = P_j // ctx``, the call with in-cycle position
``q = s - S_j + 1`` (1-based):

- records the parameters (as they are before that call) when ``q`` is a multiple of ``I_j``;
- is a nowcast instead of a base step when ``q == P_j`` (the ``ctx``-th state is the current one).

With a constant period of 1000 and ``ctx=5`` this is the published schedule: states before calls
199, 399, 599, 799 and 999 (0-based), call 999 is the nowcast, then 1199, ..., 1999 and so on.

Periods: :class:`ConstantPeriod` (the paper) or :class:`DynamicPeriod` (nowcast often early,
rarely late; the formula is in its docstring and in ``docs/optimizer.md``).

Horizons: ``"decay"`` follows the published k-decay curve over the cycles that fit in
``total_steps`` (for a constant period this is exactly ``k = round(linspace(max_k**(1/p), 1,
max(1, T // period)) ** p)[step // period]``); an ``int`` is a fixed horizon; a callable
``(cycle, step) -> int`` is anything else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import numpy as np

KSchedule = Union[str, int, Callable[[int, int], int]]


def decay_curve(n: int, max_k: int = 40, power: float = 2.0) -> list[int]:
    """``round(linspace(max_k**(1/power), 1, n) ** power)`` with numpy's linspace and rounding.

    numpy is used on purpose: the published schedule is computed with it, and its rounding (half
    to even) and linspace arithmetic decide ties.
    """
    if n < 1:
        raise ValueError(f"decay_curve needs n >= 1, got {n}")
    ks = (np.linspace(max_k ** (1.0 / power), 1.0, num=n) ** power).round().astype(np.int64)
    return [max(1, int(k)) for k in ks]


def k_decay(total_steps: int, period: int, max_k: int = 40, power: float = 2.0) -> list[int]:
    """The published horizon schedule: one ``k`` per period, indexed by ``step // period``.

    >>> k_decay(10000, 1000)
    [40, 33, 26, 21, 16, 11, 8, 5, 3, 1]
    """
    return decay_curve(max(1, total_steps // period), max_k, power)


@dataclass(frozen=True)
class ConstantPeriod:
    """Every cycle is ``period`` steps long (the NiNo paper: 1000)."""

    period: int = 1000

    def length(self, cycle: int, start: int, total_steps: int | None, ctx: int) -> int:
        return self.period

    def check(self, ctx: int, total_steps: int | None) -> None:
        if not isinstance(self.period, int) or self.period < ctx:
            raise ValueError(f"period must be an int >= ctx={ctx}, got {self.period!r}")
        if self.period % ctx:
            raise ValueError(f"period={self.period} is not divisible by ctx={ctx}: states are recorded "
                             f"every period/ctx steps; use e.g. period={ctx * max(1, round(self.period / ctx))}")


@dataclass(frozen=True)
class DynamicPeriod:
    """Short cycles early in training, long ones late.

    A cycle starting at step ``S`` of a run of ``T = total_steps`` steps is

        ``P(S) = ctx * max(1, round((min_period + (max_period - min_period) * min(1, S / T) ** power) / ctx))``

    so the first cycle is ``min_period`` long and the period grows (linearly for ``power=1``)
    to ``max_period`` at the end of the run, and stays there if training goes on. Early training
    moves fast along a smooth trajectory, where frequent nowcasts pay off most; late training
    moves slowly and a bad nowcast costs more than it gains. With the defaults and ``T=10000``
    there are 13 nowcasts (6 in the first 2000 steps) against 10 (2) for a constant period of 1000.
    """

    min_period: int = 200
    max_period: int = 2000
    power: float = 1.0

    def length(self, cycle: int, start: int, total_steps: int | None, ctx: int) -> int:
        assert total_steps is not None
        frac = min(1.0, start / total_steps) ** self.power
        raw = self.min_period + (self.max_period - self.min_period) * frac
        return ctx * max(1, int(round(raw / ctx)))

    def check(self, ctx: int, total_steps: int | None) -> None:
        if total_steps is None:
            raise ValueError("DynamicPeriod needs total_steps (the period grows with the fraction of "
                             "training done); pass total_steps=... to NiNo")
        if not (ctx <= self.min_period <= self.max_period):
            raise ValueError(f"DynamicPeriod needs ctx={ctx} <= min_period <= max_period, got "
                             f"min_period={self.min_period}, max_period={self.max_period}")
        if self.power <= 0:
            raise ValueError(f"DynamicPeriod.power must be > 0, got {self.power}")


PeriodLike = Union[int, ConstantPeriod, DynamicPeriod]


class NowcastSchedule:
    """Cycle lengths and horizons for one run; pure functions of (cycle index, cycle start)."""

    def __init__(self, period: PeriodLike, ctx: int, total_steps: int | None = None,
                 k_schedule: KSchedule = "decay", k_power: float = 2.0, max_k: int = 40) -> None:
        if not isinstance(ctx, int) or ctx < 2:
            raise ValueError(f"ctx must be an int >= 2 (a nowcast needs at least two past states), got {ctx!r}")
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(f"total_steps must be a positive int or None, got {total_steps!r}")
        if isinstance(period, bool) or not isinstance(period, (int, ConstantPeriod, DynamicPeriod)):
            raise TypeError(f"period must be an int, ConstantPeriod or DynamicPeriod, got {type(period).__name__}")
        self.period = ConstantPeriod(period) if isinstance(period, int) else period
        self.period.check(ctx, total_steps)
        self.ctx, self.total_steps = ctx, total_steps
        self.k_schedule, self.k_power, self.max_k = k_schedule, k_power, max_k
        self._ks: list[int] | None = None
        if isinstance(k_schedule, str):
            if k_schedule != "decay":
                raise ValueError(f"k_schedule must be 'decay', an int or a callable (cycle, step) -> int, "
                                 f"got {k_schedule!r}")
            if total_steps is None:
                raise ValueError("k_schedule='decay' needs total_steps (k decays from max_k to 1 over the "
                                 "run); pass total_steps=..., or a fixed horizon such as k_schedule=10")
            if not isinstance(max_k, int) or max_k < 1 or k_power <= 0:
                raise ValueError(f"k decay needs an int max_k >= 1 and k_power > 0, got max_k={max_k!r}, "
                                 f"k_power={k_power!r}")
            self._ks = decay_curve(max(1, len(self.planned())), max_k, k_power)
        elif isinstance(k_schedule, bool) or not (isinstance(k_schedule, int) or callable(k_schedule)):
            raise TypeError(f"k_schedule must be 'decay', an int or a callable, got {type(k_schedule).__name__}")
        elif isinstance(k_schedule, int) and k_schedule < 1:
            raise ValueError(f"a fixed horizon must be >= 1, got k_schedule={k_schedule}")

    def length(self, cycle: int, start: int) -> int:
        """Steps in the cycle that starts at ``start`` (a multiple of ``ctx``)."""
        return self.period.length(cycle, start, self.total_steps, self.ctx)

    def planned(self) -> list[tuple[int, int]]:
        """``(start, length)`` of every cycle whose nowcast falls inside ``total_steps``."""
        if self.total_steps is None:
            return []
        out, start, j = [], 0, 0
        while True:
            n = self.length(j, start)
            if start + n > self.total_steps:
                return out
            out.append((start, n))
            start, j = start + n, j + 1

    def k(self, cycle: int, step: int) -> int:
        """Horizon for the nowcast that ends cycle ``cycle`` (at 0-based ``step``)."""
        if self._ks is not None:
            return self._ks[min(cycle, len(self._ks) - 1)]
        if isinstance(self.k_schedule, int):
            return self.k_schedule
        k = self.k_schedule(cycle, step)  # type: ignore[operator]
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k_schedule({cycle}, {step}) returned {k!r}; it must return an int >= 1")
        return int(k)

    def describe(self) -> dict:
        return {"period": repr(self.period), "ctx": self.ctx, "total_steps": self.total_steps,
                "k_schedule": self.k_schedule if isinstance(self.k_schedule, (str, int)) else "callable",
                "k_power": self.k_power, "max_k": self.max_k}

"""The inference context: axis spaces of every tensor in a captured graph, and the rule registry.

Rules (``neugraph.rules``) read one op each and, through a :class:`Ctx`, unify the spaces that
must be permuted together, pin the ones that may not move, and record the roles of parameter axes.
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from .spaces import Pin, Spaces

RULES: dict[str, Callable[["Ctx", fx.Node], None]] = {}


def rule(*names: str):
    def deco(fn):
        for n in names:
            RULES[n] = fn
        return fn

    return deco


def op_name(node: fx.Node) -> str:
    t = node.target
    if t is operator.getitem:
        return "getitem"
    if isinstance(t, torch._ops.OpOverload):
        return t._opname
    return getattr(t, "__name__", str(t))


def bind_args(node: fx.Node) -> dict[str, Any]:
    """Arguments of an ATen call by schema name, defaults filled in."""
    t = node.target
    out: dict[str, Any] = {}
    schema = getattr(t, "_schema", None)
    if schema is None:
        return {f"arg{i}": a for i, a in enumerate(node.args)} | dict(node.kwargs)
    params = list(schema.arguments)
    for p, a in zip(params, node.args):
        out[p.name] = a
    out.update(node.kwargs)
    for p in params:
        if p.name not in out and p.has_default_value():
            out[p.name] = p.default_value
    return out


def shapes_of(val: Any):
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    if isinstance(val, (list, tuple)):
        return [shapes_of(v) for v in val]
    return None


@dataclass
class Ctx:
    sp: Spaces = field(default_factory=Spaces)
    ax: dict[str, Any] = field(default_factory=dict)  # node name -> axes (list[int] or nested)
    origin: dict[str, tuple[str, list]] = field(default_factory=dict)  # node -> (state name, axis map)
    roles: dict[str, dict] = field(default_factory=dict)  # state name -> role info
    grouped: dict[str, tuple] = field(default_factory=dict)  # state -> (axis, [spaces], block)
    head_axes: set = field(default_factory=set)  # spaces made as the heads axis of a head split
    repeated: dict[int, tuple] = field(default_factory=dict)  # kv heads axis -> (query heads axis, n_rep)
    unknown: Counter = field(default_factory=Counter)
    used_rules: Counter = field(default_factory=Counter)

    # helpers ----------------------------------------------------------------------------------
    def axes(self, a: Any) -> list[int] | None:
        if isinstance(a, fx.Node):
            v = self.ax.get(a.name)
            if isinstance(v, list) and all(isinstance(i, int) for i in v):
                return v
        return None

    def shape(self, a: Any):
        return shapes_of(a.meta.get("val")) if isinstance(a, fx.Node) else None

    def fresh(self, shape, pin: Pin | None = None) -> list[int]:
        return [self.sp.new(n, pin) for n in shape]

    def pin(self, space: int, node: fx.Node, reason: str) -> None:
        self.sp.pin(space, Pin(op_name(node), node.name, reason))

    def set(self, node: fx.Node, axes) -> None:
        self.ax[node.name] = axes

    def set_fresh_like_output(self, node: fx.Node, pin: Pin | None = None):
        s = shapes_of(node.meta.get("val"))
        self.set(node, self._fresh_nested(s, pin))

    def _fresh_nested(self, s, pin):
        if s is None:
            return None
        if isinstance(s, tuple):
            return self.fresh(s, pin)
        return [self._fresh_nested(x, pin) for x in s]

    def unify(self, a: int, b: int) -> int:
        return self.sp.unify(a, b)

    def role(self, node: Any, **info) -> None:
        """Record a role for the parameter behind ``node`` (first use wins)."""
        if not isinstance(node, fx.Node) or node.name not in self.origin:
            return
        name, amap = self.origin[node.name]
        if name in self.roles:
            return
        mapped = {}
        for k, v in info.items():
            if k in ("src", "dst"):
                if v is None or amap[v] is None:
                    return
                mapped[k] = amap[v]
            elif k == "features":
                mapped[k] = [amap[i] for i in v if amap[i] is not None]
            else:
                mapped[k] = v
        self.roles[name] = mapped

    def pass_origin(self, node: fx.Node, src: Any, amap: list | None = None) -> None:
        if isinstance(src, fx.Node) and src.name in self.origin:
            name, m = self.origin[src.name]
            amap = list(range(len(m))) if amap is None else amap
            self.origin[node.name] = (name, [m[i] if i is not None else None for i in amap])


def tensor_leaves(x: Any) -> list[fx.Node]:
    out = []
    if isinstance(x, fx.Node):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            out.extend(tensor_leaves(y))
    elif isinstance(x, dict):
        for y in x.values():
            out.extend(tensor_leaves(y))
    return out


def pin_everything(ctx: Ctx, node: fx.Node, reason: str) -> None:
    pin = Pin(op_name(node), node.name, reason)
    for a in tensor_leaves(list(node.args) + list(node.kwargs.values())):
        for s in flat_axes(ctx.ax.get(a.name)):
            ctx.sp.pin(s, pin)
    ctx.set_fresh_like_output(node, pin)


def flat_axes(v: Any) -> list[int]:
    """Every space id in a (possibly nested) axes value."""
    if v is None:
        return []
    if isinstance(v, int):
        return [v]
    out = []
    for x in v:
        out.extend(flat_axes(x))
    return out

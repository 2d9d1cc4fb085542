"""Symmetry inference: walk an ATen-level fx graph, apply the op rules, pin inputs and outputs.

Each rule (``neugraph.rules``) says which axes of its operands and result must be permuted together
(``unify``), which may not be permuted at all (``pin``), and which parameter axes are the inputs
and outputs of a contraction (roles, used later to direct edges). An op with no rule pins every
axis it touches and is listed in the diagnostics: that is always sound.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import rules as _rules  # noqa: F401  (registers the rules)
from .context import RULES, Ctx, flat_axes, op_name, pin_everything, shapes_of
from .spaces import Pin

IGNORE = """sym_size sym_numel sym_stride sym_storage_offset _assert_scalar _assert_async
_local_scalar_dense item _enter_autocast _exit_autocast _set_grad_enabled""".split()


@dataclass
class Inference:
    ctx: Ctx
    state_axes: dict[str, list[int]]  # state name -> spaces of its axes
    activations: list[list[int]]  # every tensor axis list seen in the graph


def run(cap) -> Inference:
    """Apply the rules to a :class:`frontends.Captured` graph."""
    ctx = Ctx()
    state_axes: dict[str, list[int]] = {}
    for node in cap.graph.nodes:
        if node.op == "placeholder":
            shape = shapes_of(node.meta.get("val"))
            if node.name in cap.params or node.name in cap.buffers:
                name = cap.params.get(node.name) or cap.buffers[node.name]
                unused = None
                if node.name in cap.buffers and not node.users:  # lifted but never read
                    unused = Pin("unused", node.name, "buffer not used by forward")
                axes = ctx.fresh(shape, unused)
                ctx.set(node, axes)
                ctx.origin[node.name] = (name, list(range(len(shape))))
                if name in state_axes:  # the same tensor seen twice: one set of spaces
                    for x, y in zip(state_axes[name], axes):
                        ctx.unify(x, y)
                else:
                    state_axes[name] = axes
            elif node.name in cap.constants:
                ctx.set(node, ctx._fresh_nested(shape, Pin("constant", node.name, "lifted constant tensor")))
            else:
                ctx.set(node, ctx._fresh_nested(shape, Pin("input", node.name, "model input")))
        elif node.op == "get_attr":
            ctx.set_fresh_like_output(node, Pin("get_attr", node.name, "constant attribute"))
        elif node.op == "call_function":
            name = op_name(node)
            if name in IGNORE:
                continue
            fn = RULES.get(name)
            if fn is None:
                ctx.unknown[name] += 1
                pin_everything(ctx, node, f"no symmetry rule for op {name}")
                continue
            try:
                fn(ctx, node)
                ctx.used_rules[name] += 1
            except Exception as exc:  # a rule met a form it does not handle: pin, never guess
                pin_everything(ctx, node, f"rule for {name} could not handle this call ({type(exc).__name__}: {exc})")
            if node.name not in ctx.ax and shapes_of(node.meta.get("val")) is not None:
                pin_everything(ctx, node, f"rule for {name} left the result without axes")
        elif node.op in ("call_module", "call_method"):
            ctx.unknown[str(node.target)] += 1
            pin_everything(ctx, node, f"unlowered {node.op} {node.target}")
    for out in cap.outputs:
        for s in flat_axes(ctx.ax.get(out.name)):
            ctx.sp.pin(s, Pin("output", out.name, "model output"))
    activations = [v for v in ctx.ax.values() if isinstance(v, list) and all(isinstance(i, int) for i in v)]
    for v in ctx.ax.values():
        if isinstance(v, list) and v and isinstance(v[0], list):
            activations.extend(x for x in v if isinstance(x, list) and all(isinstance(i, int) for i in x))
    return Inference(ctx, state_axes, activations)

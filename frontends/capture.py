"""Capture a torch module as an ATen-level ``torch.fx`` graph with shapes.

``torch.export`` (non-strict) is tried first. When it fails, the module is traced with
``torch.fx.symbolic_trace`` and the traced module is lowered to the same ATen vocabulary with
``make_fx(pre_dispatch=True)``, so one set of symmetry rules serves both paths. When neither works a
:class:`CaptureError` names the module that was running and the op or Python construct that failed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

__all__ = ["Captured", "CaptureError", "capture"]


class CaptureError(RuntimeError):
    """Neither ``torch.export`` nor ``torch.fx.symbolic_trace`` could capture the module."""


@dataclass
class Captured:
    """An ATen-level graph plus what each placeholder is.

    ``params``/``buffers`` map placeholder node names to state-dict names (tied parameters appear
    once, under their first name); ``inputs`` are the user-input placeholders in order;
    ``outputs`` are the graph output nodes that are user outputs (buffer mutations excluded);
    ``constants`` are placeholders holding lifted constant tensors.
    """

    graph: fx.Graph
    method: str  # "export" or "fx"
    params: dict[str, str]
    buffers: dict[str, str]
    inputs: list[str]
    outputs: list[fx.Node]
    constants: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)  # other names of a tied tensor -> its canonical name


@contextlib.contextmanager
def _module_stack(module: torch.nn.Module):
    """Record which submodule is running, so a failure can name it."""
    stack: list[str] = []
    handles = []
    for name, sub in module.named_modules():
        label = f"{name or '<root>'} ({type(sub).__name__})"

        def pre(_m, _a, label=label):
            stack.append(label)

        def post(_m, _a, _o, label=label):
            if stack and stack[-1] == label:
                stack.pop()

        handles.append(sub.register_forward_pre_hook(pre))
        handles.append(sub.register_forward_hook(post))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def _canonical_names(module: torch.nn.Module) -> dict[str, str]:
    """Every name of a tied tensor -> the name ``named_parameters()``/``named_buffers()`` report."""
    out: dict[str, str] = {}
    for named in (module.named_parameters, module.named_buffers):
        first: dict[int, str] = {}
        for n, t in named(remove_duplicate=False):
            out[n] = first.setdefault(id(t), n)
    return out


def _capture_export(module: torch.nn.Module, args: tuple, kwargs: dict) -> Captured:
    ep = torch.export.export(module, args, kwargs=kwargs or None, strict=False)
    sig = ep.graph_signature
    from torch.export.graph_signature import InputKind, OutputKind

    canon = _canonical_names(module)
    params, buffers, inputs, constants = {}, {}, [], {}
    for spec in sig.input_specs:
        name = spec.arg.name
        if spec.kind == InputKind.PARAMETER:
            params[name] = canon.get(spec.target, spec.target)
        elif spec.kind == InputKind.BUFFER:
            buffers[name] = canon.get(spec.target, spec.target)
        elif spec.kind == InputKind.USER_INPUT:
            inputs.append(name)
        elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
            constants[name] = str(spec.target)
        else:
            inputs.append(name)
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    flat_out = list(out_node.args[0])
    outputs = [
        node
        for node, spec in zip(flat_out, sig.output_specs)
        if spec.kind == OutputKind.USER_OUTPUT and isinstance(node, fx.Node)
    ]
    aliases = {a: n for a, n in canon.items() if a != n}
    return Captured(ep.graph, "export", params, buffers, inputs, outputs, constants, aliases=aliases)


def _capture_fx(module: torch.nn.Module, args: tuple, kwargs: dict) -> Captured:
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.func import functional_call

    traced = fx.symbolic_trace(module)
    pnames = [n for n, _ in module.named_parameters()]
    bnames = [n for n, _ in module.named_buffers()]
    state = dict(module.named_parameters())
    state.update(dict(module.named_buffers()))
    # copies: tracing runs the real forward, which must not update the caller's buffers (BN statistics)
    values = [state[n].detach().clone() for n in pnames + bnames]
    names = pnames + bnames

    def run(values, args):
        return functional_call(traced, dict(zip(names, values)), tuple(args), kwargs or {})

    gm = make_fx(run, pre_dispatch=True)(values, list(args))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params = {p.name: n for p, n in zip(placeholders[: len(pnames)], pnames)}
    buffers = {p.name: n for p, n in zip(placeholders[len(pnames): len(names)], bnames)}
    inputs = [p.name for p in placeholders[len(names):]]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = [n for n in torch.utils._pytree.tree_leaves(out_node.args) if isinstance(n, fx.Node)]
    aliases = {a: n for a, n in _canonical_names(module).items() if a != n}
    return Captured(gm.graph, "fx", params, buffers, inputs, outputs, aliases=aliases)


def _is_hf_model(module: torch.nn.Module) -> bool:
    """A Hugging Face ``PreTrainedModel`` whose forward takes ``use_cache`` (checked without importing transformers)."""
    if not any(c.__name__ == "PreTrainedModel" for c in type(module).__mro__):
        return False
    import inspect

    return "use_cache" in inspect.signature(module.forward).parameters


def capture(module: torch.nn.Module, example_inputs: Any, kwargs: dict | None = None) -> Captured:
    """Capture ``module`` called on ``example_inputs`` (a tensor or a tuple of arguments)."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"capture() needs a torch.nn.Module, got {type(module).__name__}")
    args = _as_tuple(example_inputs)
    kwargs = dict(kwargs or {})
    if _is_hf_model(module):
        # a key/value cache is not a tensor output and adds nothing to the model's symmetry
        kwargs.setdefault("use_cache", False)
    errors: list[str] = []
    for method, fn in (("torch.export", _capture_export), ("torch.fx.symbolic_trace", _capture_fx)):
        with _module_stack(module) as stack:
            try:
                with torch.no_grad():
                    cap = fn(module, args, kwargs)
                if errors:
                    cap.notes.append(f"torch.export failed, used {method}: {errors[0]}")
                return cap
            except Exception as exc:  # noqa: BLE001 - reported below with context
                where = stack[-1] if stack else f"<root> ({type(module).__name__})"
                msg = str(exc).strip().splitlines()
                first = next((line for line in msg if line.strip()), type(exc).__name__)
                errors.append(f"{method} failed in module {where}: {type(exc).__name__}: {first[:300]}")
    raise CaptureError(
        "could not capture the module; " + " | ".join(errors)
        + ". Fix: remove data-dependent Python control flow (e.g. `if x.sum() > 0`) or calls that"
        " leave torch from the failing module's forward, or pass example_inputs that match forward()."
    )

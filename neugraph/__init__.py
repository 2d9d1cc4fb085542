"""neugraph: compile any PyTorch module into a verified neural graph.

``trace`` captures a module and infers its neuron permutation symmetry (a :class:`ModelIR`);
``compile`` emits graph tensors under a profile (a :class:`NeuralGraph`); ``verify`` checks both
against the module itself.
"""
from __future__ import annotations

from typing import Any

import torch

from .emit import PROFILES, emit
from .graph import NINO_TYPES, NeuralGraph
from .ir import ModelIR, Permutation

__all__ = ["trace", "compile", "verify", "ModelIR", "NeuralGraph", "Permutation", "PROFILES", "NINO_TYPES"]


def trace(module: torch.nn.Module, example_inputs: Any, kwargs: dict | None = None) -> ModelIR:
    """Capture ``module`` on ``example_inputs`` and infer its symmetry group."""
    from frontends import capture  # imported here: neugraph does not depend on a frontend at import

    from . import infer, ir

    cap = capture(module, example_inputs, kwargs)
    result = infer.run(cap)
    return ir.build(result, cap, module)


def compile(module_or_ir: torch.nn.Module | ModelIR, example_inputs: Any = None, *, profile: str = "nino",
            lpe: int = 8, centrality: bool = False, kwargs: dict | None = None) -> NeuralGraph:
    """Compile a module (or an already traced :class:`ModelIR`) into a :class:`NeuralGraph`."""
    if isinstance(module_or_ir, ModelIR):
        model_ir = module_or_ir
    else:
        if example_inputs is None:
            raise ValueError("compile(module) needs example_inputs (a tensor or a tuple of forward() "
                             "arguments) to trace the module; or pass a ModelIR from neugraph.trace")
        model_ir = trace(module_or_ir, example_inputs, kwargs)
    return emit(model_ir, profile=profile, lpe=lpe, centrality=centrality)


def verify(module: torch.nn.Module, example_inputs: Any, trials: int = 16, **kw):
    """Check the inferred symmetry against the module; see :func:`neugraph.verification.verify`."""
    from .verification import verify as _verify

    return _verify(module, example_inputs, trials=trials, **kw)

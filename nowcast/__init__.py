"""Nowcasters that consume compiled neural graphs (NiNo GNN, WNN+, Linefit, Linefit+, NoChange).

Depends on :mod:`neugraph`'s public API only. Every nowcaster has
``predict(graph, states, k) -> (num_params,)`` (see :mod:`nowcast.base`); ``load`` reads the
published NiNo checkpoints and our own safetensors format, ``save`` writes the latter.
"""
from .base import Nowcaster
from .checkpoint import CheckpointError, load, save
from .gnn import NiNoGNN
from .linefit import Linefit, LinefitPlus, NoChange
from .scaling import METHODS as SCALING_METHODS
from .scaling import Scales, scale, unscale
from .scatter import get_backend as scatter_backend
from .scatter import set_backend as set_scatter_backend
from .stream import stream_predict
from .wnn import WNNPlus
from .gate import SkillGate
from .shipped import SHIPPED_GATE, shipped

__all__ = ["Nowcaster", "NiNoGNN", "WNNPlus", "Linefit", "LinefitPlus", "NoChange", "load", "save", "CheckpointError",
           "scale", "unscale", "Scales", "SCALING_METHODS", "scatter_backend", "set_scatter_backend",
           "stream_predict", "SkillGate", "shipped", "SHIPPED_GATE"]

# ---- the optimizer wrapper (docs/optimizer.md) ---------------------------------------------------
from .optim import NiNo, NowcastError, NowcastRejectedWarning  # noqa: E402
from .schedule import DynamicPeriod, k_decay  # noqa: E402

__all__ += ["NiNo", "NowcastError", "NowcastRejectedWarning", "DynamicPeriod", "k_decay"]

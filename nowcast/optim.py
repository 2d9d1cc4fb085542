"""``NiNo``: a ``torch.optim.Optimizer`` that wraps any base optimizer and periodically nowcasts.

Most steps are the base optimizer's. Every cycle (``period`` steps, see :mod:`nowcast.schedule`)
NiNo records ``ctx`` parameter states, ``period // ctx`` steps apart, and replaces the base step at
the ``ctx``-th state by a nowcast: the parameters are set to ``nowcaster.predict(graph, states, k)``.

Exactly which calls do what (0-based count ``s`` of ``step()`` calls; constant period ``P``,
``I = P // ctx``): the call ``s`` records the parameters as they are before it when
``(s + 1) % I == 0`` and ``(s + 1) % P != 0``; the call with ``(s + 1) % P == 0`` is the nowcast
(its ``ctx``-th state is the current parameters). ``period=1000, ctx=5``: states before calls
199, 399, 599, 799; call 999 nowcasts from those and the current parameters; then 1199 ... 1999.

Safety: a nowcast whose values are NaN, inf or out of the parameter dtype's range, or (when
``step(closure)`` is given) whose loss is not finite or above ``spike_factor`` times the loss
before it, is rolled back to the exact previous parameters, with a :class:`NowcastRejectedWarning`
and ``state["nowcasts_rejected"] += 1``. Then, with ``on_reject="skip"`` (default), that step
changes nothing; with ``on_reject="base"``, the base optimizer takes the step instead (after
calling ``closure`` again, so its gradients are the restored parameters'), and a run whose every
nowcast is rejected is the base optimizer's run exactly. If
``predict`` raises, the parameters and NiNo's state are untouched and :class:`NowcastError`
propagates (a later ``step()`` retries the nowcast).
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Union

import torch

from .schedule import KSchedule, NowcastSchedule, PeriodLike

if TYPE_CHECKING:  # neugraph is imported lazily, only when a graph has to be compiled
    from neugraph import NeuralGraph

Closure = Callable[[], Union[float, torch.Tensor]]

__all__ = ["NiNo", "NowcastError", "NowcastRejectedWarning", "unwrap_model"]


class NowcasterLike(Protocol):
    """What NiNo needs from a nowcaster (``nowcast.base.Nowcaster`` subclasses have it)."""

    needs_graph: bool

    def predict(self, graph: Optional["NeuralGraph"], states: torch.Tensor, k: int) -> torch.Tensor: ...


class NowcastError(RuntimeError):
    """The nowcaster failed; the model's parameters and NiNo's state were not changed."""


class NowcastRejectedWarning(RuntimeWarning):
    """A nowcast was rolled back: non-finite parameters, or a non-finite or spiking loss."""


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (their
    parameter names carry a ``module.`` prefix that the compiled graph does not have)."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model


def _collect(model_or_params: Any) -> tuple[Optional[torch.nn.Module], Optional[list[str]], list[torch.Tensor]]:
    """(module, names, params) with tied parameters once, in ``named_parameters()`` order."""
    if isinstance(model_or_params, torch.nn.Module):
        model_or_params = unwrap_model(model_or_params)
        named = list(model_or_params.named_parameters())
        return model_or_params, [n for n, _ in named], [p for _, p in named]
    if isinstance(model_or_params, torch.Tensor):
        raise TypeError("NiNo needs a model or an iterable of parameters, not a single tensor; "
                        "pass model or [tensor]")
    names: list[str] = []
    params: list[torch.Tensor] = []
    seen: set[int] = set()
    for item in model_or_params:
        if isinstance(item, dict):  # a param group
            group = item["params"]
            pairs = [(None, group)] if isinstance(group, torch.Tensor) else [(None, p) for p in group]
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor):
            pairs = [item]
        elif isinstance(item, torch.Tensor):
            pairs = [(None, item)]
        else:
            raise TypeError(f"NiNo got a {type(item).__name__} among the parameters; pass a model, tensors, "
                            "(name, tensor) pairs or param-group dicts")
        for name, p in pairs:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
                names.append(name)
    if not params:
        raise ValueError("NiNo got an empty parameter list")
    return None, (names if all(n is not None for n in names) else None), params


#: ``NiNo(hold=...)``: None (default), ``"auto"``, ``"norms"``, ``"embeddings"``, ``"vectors"``, a
#: ``+``-joined combination such as ``"norms+embeddings"``, or a predicate on (name, parameter)
HoldLike = Union[None, str, Callable[[str, torch.Tensor], bool]]
_NORM_TYPES = tuple(t for t in (torch.nn.LayerNorm, torch.nn.GroupNorm, getattr(torch.nn, "RMSNorm", None),
                                torch.nn.modules.batchnorm._NormBase) if t is not None)


def is_norm_module(module: torch.nn.Module) -> bool:
    """A normalisation layer: a torch norm class, or any module whose class name ends in ``Norm``
    (``LlamaRMSNorm``, ``T5LayerNorm``, ...)."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


def norm_parameters(module: torch.nn.Module) -> set[int]:
    """ids of the parameters that normalisation layers own directly."""
    return {id(p) for m in module.modules() if is_norm_module(m) for p in m.parameters(recurse=False)}


def embedding_parameters(module: torch.nn.Module) -> set[int]:
    """ids of the parameters that ``nn.Embedding``/``nn.EmbeddingBag`` tables own directly (a tied output
    head shares its tensor, so it is included)."""
    kinds = (torch.nn.Embedding, torch.nn.EmbeddingBag)
    return {id(p) for m in module.modules() if isinstance(m, kinds) for p in m.parameters(recurse=False)}


def vector_parameters(module: torch.nn.Module) -> set[int]:
    """ids of the 1-D parameters (biases, normalisation gains and shifts)."""
    return {id(p) for p in module.parameters() if p.dim() == 1}


_HOLD_SETS = {"norms": norm_parameters, "embeddings": embedding_parameters, "vectors": vector_parameters}
_HOLD_CHOICES = "'auto', None, 'norms', 'embeddings', 'vectors' (or a '+'-joined set of them) or a callable"


def resolve_hold(hold: HoldLike, module: Optional[torch.nn.Module]) -> HoldLike:
    """What ``hold="auto"`` means for ``module``: ``"vectors"`` when it has a normalisation layer
    (a transformer), else None. Not the default: on GPT-2 BPE it keeps the shipped checkpoint within
    2% of AdamW's final perplexity (the ~1,000 bias and LayerNorm values are where its harm sits),
    but on the byte-level GPT-2 tasks it is worse than nowcasting everything (README, Known limits).
    Without the model (parameters only) there are no layers to see: None. Any other value is
    returned as it is."""
    if not (isinstance(hold, str) and hold == "auto"):
        return hold
    if module is not None and any(is_norm_module(m) for m in module.modules()):
        return "vectors"
    return None


def _held_indices(hold: HoldLike, module: Optional[torch.nn.Module], names: Optional[list[str]],
                  params: list[torch.Tensor], tracked: list[int]) -> set[int]:
    """Indices (into ``params``) of the tracked parameters ``hold`` selects."""
    if hold is None:
        return set()
    if isinstance(hold, str):
        kinds = [k.strip() for k in hold.split("+")]
        unknown = [k for k in kinds if k not in _HOLD_SETS]
        if unknown:
            raise ValueError(f"hold={hold!r}: pass {_HOLD_CHOICES} (name, parameter) -> bool")
        if module is None:
            raise ValueError(f"hold={hold!r} needs the model to find those layers: pass NiNo(model, ...), "
                             "or a callable hold=(name, parameter) -> bool with the parameters")
        ids = set().union(*(_HOLD_SETS[k](module) for k in kinds))
        return {i for i in tracked if id(params[i]) in ids}
    if not callable(hold):
        raise TypeError(f"hold must be {_HOLD_CHOICES} (name, parameter) -> bool, got {type(hold).__name__}")
    return {i for i in tracked if hold(names[i] if names and names[i] else "", params[i])}


def _as_float(loss: Any) -> float:
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)


class NiNo(torch.optim.Optimizer):
    """Wrap ``base_optimizer`` and replace one of its steps per cycle by a nowcast.

    Args:
        model_or_params: the model (preferred: names, tied parameters and the graph come from it;
            a ``DistributedDataParallel``/``DataParallel`` wrapper is unwrapped) or its parameters
            in ``named_parameters()`` order.
        base_optimizer: any ``torch.optim.Optimizer`` over (some of) these parameters. NiNo's
            ``param_groups`` *is* its list, so LR schedulers on either object work.
        nowcaster: has ``predict(graph, states, k)`` and ``needs_graph``; ``None`` makes NiNo a
            transparent wrapper (a baseline with the same loop).
        period: cycle length (int, multiple of ``ctx``) or a :class:`~nowcast.schedule.DynamicPeriod`.
        ctx: states per nowcast (>= 2), oldest first; must equal ``nowcaster.ctx`` if it has one.
            None (default): the nowcaster's ``ctx``, else 5 (NiNo's).
        total_steps: planned number of ``step()`` calls; needed by ``k_schedule="decay"`` and
            ``DynamicPeriod``.
        example_inputs, graph: for a nowcaster with ``needs_graph``: a compiled
            ``neugraph.NeuralGraph``, or inputs to compile the model with
            ``neugraph.compile(model, example_inputs, profile=graph_profile)``.
        k_schedule: ``"decay"`` (NINO_V1.md, ``max_k`` down to 1 with power ``k_power``), an int,
            or a callable ``(cycle, step) -> k``.
        history_device: ``"cpu"`` (default), ``"param"`` (the first trainable parameter's device)
            or any device. ``history_dtype``: default the parameters' (promoted) dtype, so the
            history is exact; ``torch.bfloat16`` halves it.
        nowcast_device: where ``states`` are built and ``predict`` runs; default the nowcaster's
            own parameters' device, else the first trainable parameter's device.
        spike_factor: with ``step(closure)``: reject a nowcast whose loss after exceeds
            ``before + (spike_factor - 1) * |before|`` (``spike_factor`` times the loss for
            positive losses). ``None``: only non-finite losses are rejected.
        hold: parameters a nowcast leaves where they are (as the ``NoChange`` control would): None
            (default: nowcast every parameter), ``"auto"`` (``"vectors"`` for a model with
            normalisation layers, else None; see :func:`resolve_hold`; ``self.hold`` is what it
            resolved to), ``"vectors"`` (every 1-D parameter: biases, norm gains and shifts), ``"norms"`` (the parameters of normalisation layers: LayerNorm,
            RMSNorm, GroupNorm, BatchNorm and any module whose class name ends in ``Norm``; needs
            the model), ``"embeddings"`` (the tables of ``nn.Embedding``/``nn.EmbeddingBag``
            modules, a tied output head included; needs the model), ``"norms+embeddings"``, or a
            callable ``(name, parameter) -> bool``. The nowcaster still predicts
            them; the prediction is not written. ``held_names`` and ``num_held`` say what matched.
        min_k: skip a nowcast whose horizon ``k`` is below this (the base optimizer takes that step;
            the cycle ends as usual). A nowcast *replaces* one base step, so one at ``k=1`` can save
            no step and only risks a worse state, and the published k-decay ends with exactly such
            a nowcast at the last step of the run. 1 (default): every nowcast runs, as published;
            2 skips only the ``k=1`` ones. Skips are counted in ``state["nowcasts_skipped"]``.
        on_reject: what a rejected nowcast's step does: ``"skip"`` (nothing) or ``"base"`` (the
            base optimizer's step: with ``step(closure)``, the closure is called once more on the
            restored parameters and must compute fresh gradients, as a standard closure does;
            without one, the gradients the parameters hold are used).

    Trainable parameters are those with ``requires_grad`` that the base optimizer holds, fixed at
    construction; only they are recorded and changed. Other parameters enter ``states`` as their
    current value repeated. ``states`` is float32 ``(num_params, ctx)`` in parameter order.
    ``state`` holds ``step``, ``cycle``, ``cycle_start``, ``history``, ``nowcasts``,
    ``nowcasts_rejected`` and ``last_nowcast``; the base optimizer's per-parameter state stays in
    ``base_optimizer.state``. ``state_dict()`` holds both, so a resumed run continues exactly.
    """

    def __init__(self, model_or_params: Any, base_optimizer: torch.optim.Optimizer,
                 nowcaster: Optional[NowcasterLike], period: PeriodLike = 1000, ctx: Optional[int] = None,
                 total_steps: Optional[int] = None, example_inputs: Any = None,
                 graph: Optional["NeuralGraph"] = None, *, k_schedule: KSchedule = "decay",
                 k_power: float = 2.0, max_k: int = 40, history_device: Union[str, torch.device] = "cpu",
                 history_dtype: Optional[torch.dtype] = None,
                 nowcast_device: Union[str, torch.device, None] = None,
                 spike_factor: Optional[float] = None, on_reject: str = "skip",
                 graph_profile: str = "nino", hold: HoldLike = None, min_k: int = 1) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer) or isinstance(base_optimizer, NiNo):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer (not NiNo), got "
                            f"{type(base_optimizer).__name__}")
        self.base_optimizer = base_optimizer
        self._init_hooks()
        module, self.param_names, self._params = _collect(model_or_params)

        held = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
        extra = held - {id(p) for p in self._params}
        if extra:
            raise ValueError(f"the base optimizer holds {len(extra)} tensor(s) that are not parameters of the "
                             "model given to NiNo; pass the model (or all parameters) the base optimizer trains")
        self._offsets: list[int] = []
        self._tracked: list[int] = []  # indices into self._params
        self._tracked_offsets: dict[int, int] = {}
        offset = tracked_offset = 0
        for i, p in enumerate(self._params):
            self._offsets.append(offset)
            offset += p.numel()
            if p.requires_grad and id(p) in held:
                self._tracked.append(i)
                self._tracked_offsets[i] = tracked_offset
                tracked_offset += p.numel()
        self.num_params, self.num_tracked = offset, tracked_offset
        self.hold = resolve_hold(hold, module)
        self._held = _held_indices(self.hold, module, self.param_names, self._params, self._tracked)
        self.held_names = [self.param_names[i] if self.param_names and self.param_names[i] else f"parameter #{i}"
                           for i in sorted(self._held)]
        self.num_held = sum(self._params[i].numel() for i in self._held)
        self._written = [i for i in self._tracked if i not in self._held]

        if spike_factor is not None and not (isinstance(spike_factor, (int, float)) and spike_factor >= 1):
            raise ValueError(f"spike_factor must be None or a number >= 1, got {spike_factor!r}")
        self.spike_factor = spike_factor
        if on_reject not in ("skip", "base"):
            raise ValueError(f"on_reject must be 'skip' (a rejected nowcast's step changes nothing) or 'base' "
                             f"(the base optimizer takes that step), got {on_reject!r}")
        self.on_reject = on_reject
        if isinstance(min_k, bool) or not isinstance(min_k, int) or min_k < 1:
            raise ValueError(f"min_k must be an int >= 1 (1 runs every nowcast; 2 skips the k=1 ones), got {min_k!r}")
        self.min_k = min_k
        self.nowcaster = nowcaster
        if ctx is None:
            own_ctx = getattr(nowcaster, "ctx", None)
            ctx = own_ctx if isinstance(own_ctx, int) and not isinstance(own_ctx, bool) else 5
        self.ctx = ctx
        if callable(getattr(nowcaster, "reset", None)):
            nowcaster.reset()  # a nowcaster with per-run state (SkillGate's decision) starts this run afresh
        self.schedule: Optional[NowcastSchedule] = None
        self.graph: Optional["NeuralGraph"] = None
        tracked = [self._params[i] for i in self._tracked]
        if history_device == "param":
            history_device = tracked[0].device if tracked else torch.device("cpu")
        self.history_device = torch.device(history_device)
        if history_dtype is None:
            history_dtype = torch.float32
            if tracked:
                history_dtype = tracked[0].dtype
                for p in tracked[1:]:
                    history_dtype = torch.promote_types(history_dtype, p.dtype)
        self.history_dtype = history_dtype
        if nowcaster is not None:
            self._check_nowcaster(nowcaster, ctx)
            self.schedule = NowcastSchedule(period, ctx, total_steps, k_schedule, k_power, max_k)
            self._check_horizon(nowcaster, k_schedule, max_k)
            if getattr(nowcaster, "needs_graph", False):
                self.graph = self._resolve_graph(module, example_inputs, graph, graph_profile)
            if nowcast_device is None:
                own = next(iter(nowcaster.parameters()), None) if isinstance(nowcaster, torch.nn.Module) else None
                nowcast_device = own.device if own is not None else (
                    tracked[0].device if tracked else torch.device("cpu"))
        self.nowcast_device = torch.device(nowcast_device) if nowcast_device is not None else torch.device("cpu")
        self._length_cache: tuple[int, int, int] = (-1, -1, 0)
        self.state: dict[str, Any] = {"step": 0, "cycle": 0, "cycle_start": 0, "history": [],
                                      "nowcasts": 0, "nowcasts_rejected": 0, "nowcasts_skipped": 0,
                                      "last_nowcast": None}

    #: whether this instance records the history (False on the receiving ranks of
    #: ``DistributedNiNo(sync="broadcast")``, which never predict)
    _history_here: bool = True

    # ---- torch.optim.Optimizer plumbing ------------------------------------------------------
    def _init_hooks(self) -> None:
        """What ``Optimizer.__init__`` sets up, without building param groups of our own."""
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        """The base optimizer's list itself (also after ``load_state_dict`` replaces it)."""
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.base_optimizer.param_groups = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.base_optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.base_optimizer.defaults = value

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("step", None)  # an LR scheduler's per-instance wrapper of step() (a closure)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        sched = self.schedule.describe() if self.schedule else None
        return (f"NiNo(nowcaster={type(self.nowcaster).__name__}, schedule={sched}, "
                f"base_optimizer={self.base_optimizer!r})")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Added to the base optimizer; NiNo never nowcasts parameters added after construction."""
        self.base_optimizer.add_param_group(param_group)

    # ---- construction checks ----------------------------------------------------------------
    @staticmethod
    def _check_nowcaster(nowcaster: Any, ctx: int) -> None:
        if not callable(getattr(nowcaster, "predict", None)):
            raise TypeError(f"nowcaster must have predict(graph, states, k); {type(nowcaster).__name__} has not")
        own = getattr(nowcaster, "ctx", None)
        if isinstance(own, int) and own != ctx:
            raise ValueError(f"ctx={ctx} but the nowcaster was built for ctx={own} states; pass ctx={own}")

    @staticmethod
    def _check_horizon(nowcaster: Any, k_schedule: KSchedule, max_k: int) -> None:
        top = getattr(nowcaster, "max_horizon", None)
        if not isinstance(top, int):
            return
        asked = max_k if k_schedule == "decay" else k_schedule if isinstance(k_schedule, int) else None
        if asked is not None and asked > top:
            what = "max_k" if k_schedule == "decay" else "k_schedule"
            raise ValueError(f"{what}={asked} but {type(nowcaster).__name__} predicts at most {top} states ahead; "
                             f"pass {what}={top} or less")

    def _resolve_graph(self, module: Optional[torch.nn.Module], example_inputs: Any,
                       graph: Optional["NeuralGraph"], profile: str) -> "NeuralGraph":
        name = type(self.nowcaster).__name__
        if graph is None:
            if module is None:
                raise ValueError(f"{name} needs a neural graph: pass graph=neugraph.compile(model, example_inputs, "
                                 f"profile={profile!r}), or give NiNo the model itself and example_inputs")
            if example_inputs is None:
                raise ValueError(f"{name} needs a neural graph: pass example_inputs (a batch of model inputs, or a "
                                 f"tuple of forward() arguments) so NiNo can compile the model, or "
                                 f"graph=neugraph.compile(model, example_inputs, profile={profile!r})")
            import neugraph

            graph = neugraph.compile(module, example_inputs, profile=profile)
        if graph.num_params != self.num_params:
            raise ValueError(f"the graph has {graph.num_params} parameters but the model has {self.num_params}; "
                             "compile the graph from this model (tied parameters count once)")
        if self.param_names is not None and list(graph.param_names) != self.param_names:
            diff = next(i for i, (a, b) in enumerate(zip(graph.param_names, self.param_names)) if a != b)
            raise ValueError(f"the graph's parameter order differs from the model's at position {diff}: "
                             f"{graph.param_names[diff]!r} vs {self.param_names[diff]!r}; compile the graph "
                             "from this model")
        shapes = [tuple(p.shape) for p in self._params]
        if [tuple(s) for s in graph.param_shapes] != shapes:
            raise ValueError("the graph's parameter shapes differ from the model's; compile the graph from "
                             "this model, with parameters in named_parameters() order")
        return graph

    # ---- schedule ----------------------------------------------------------------------------
    def _cycle_length(self) -> int:
        cycle, start = self.state["cycle"], self.state["cycle_start"]
        if self._length_cache[:2] != (cycle, start):
            assert self.schedule is not None
            self._length_cache = (cycle, start, self.schedule.length(cycle, start))
        return self._length_cache[2]

    @property
    def next_nowcast_step(self) -> Optional[int]:
        """0-based index of the ``step()`` call that will be the next nowcast (``None``: never)."""
        if self.nowcaster is None:
            return None
        return self.state["cycle_start"] + self._cycle_length() - 1

    def _skips(self, cycle: int, step: int) -> bool:
        """Whether the nowcast that ends ``cycle`` (at ``step``) falls below ``min_k``."""
        assert self.schedule is not None
        return self.min_k > 1 and self.schedule.k(cycle, step) < self.min_k

    @property
    def need_grads(self) -> bool:
        """False when the next ``step()`` is a nowcast: the loop may skip the backward pass."""
        st = self.state
        return self.next_nowcast_step != st["step"] or self._skips(st["cycle"], st["step"])

    # ---- the step ----------------------------------------------------------------------------
    def step(self, closure: Optional[Closure] = None) -> Any:  # type: ignore[override]
        """A base step, or a nowcast at the end of a cycle (then ``closure``, if given, is called
        before and after it for the safety check, and once more, for the base step's gradients,
        when ``on_reject="base"`` replaces a rejected nowcast)."""
        st = self.state
        if self.nowcaster is None:
            loss = self.base_optimizer.step(closure)
            st["step"] += 1
            return loss
        length = self._cycle_length()
        q = st["step"] - st["cycle_start"] + 1  # 1-based position in the cycle
        interval = length // self.ctx
        if q < length and q % interval == 0:
            self._record(q // interval)
        if q >= length and self._skips(st["cycle"], st["step"]):
            loss = self.base_optimizer.step(closure)
            self._skip()
        elif q >= length:
            loss = self._nowcast(closure)
            last = st["last_nowcast"]
            if self.on_reject == "base" and not last["accepted"]:
                loss = self.base_optimizer.step(closure)  # re-runs the closure: gradients at the restored values
                last["base_step"] = True
        else:
            loss = self.base_optimizer.step(closure)
        st["step"] += 1
        return loss

    def _record(self, m: int) -> None:
        """Append state ``m`` (1-based) unless a failed, retried step already did."""
        history = self.state["history"]
        if len(history) >= m:
            return
        if len(history) != m - 1:
            raise RuntimeError(f"NiNo history has {len(history)} states at the {m}-th recording point; "
                               "the state was edited or loaded inconsistently")
        flat = torch.empty(self.num_tracked, dtype=self.history_dtype, device=self.history_device)
        for i in self._tracked:
            p, o = self._params[i], self._tracked_offsets[i]
            flat[o: o + p.numel()].copy_(p.detach().reshape(-1))
        history.append(flat)

    def _states(self) -> torch.Tensor:
        """(num_params, ctx) float32: recorded states, then the current parameters."""
        history, ctx = self.state["history"], self.ctx
        states = torch.empty(self.num_params, ctx, dtype=torch.float32, device=self.nowcast_device)
        for i, p in enumerate(self._params):
            o, n = self._offsets[i], p.numel()
            cur = p.detach().reshape(-1)
            if i in self._tracked_offsets:
                to = self._tracked_offsets[i]
                for t, h in enumerate(history):
                    states[o: o + n, t].copy_(h[to: to + n])
                states[o: o + n, ctx - 1].copy_(cur)
            else:
                states[o: o + n].copy_(cur.unsqueeze(1).expand(n, ctx))
        return states

    def _nowcast(self, closure: Optional[Closure]) -> Any:
        st = self.state
        s, cycle = st["step"], st["cycle"]
        assert self.schedule is not None and self.nowcaster is not None
        if self._history_here and len(st["history"]) != self.ctx - 1:
            raise RuntimeError(f"NiNo expected {self.ctx - 1} recorded states at the nowcast of step {s}, "
                               f"found {len(st['history'])}; the state was edited or loaded inconsistently")
        k = self.schedule.k(cycle, s)
        loss_before = None
        if closure is not None:
            with torch.enable_grad():
                loss_before = closure()
        try:
            pred = self._predict(k)
        except Exception as e:
            raise NowcastError(f"{type(self.nowcaster).__name__}.predict failed at step {s} (k={k}): "
                               f"{type(e).__name__}: {e}. The model's parameters and NiNo's state were not "
                               "changed; calling step() again retries the nowcast") from e
        if not isinstance(pred, torch.Tensor) or tuple(pred.shape) != (self.num_params,):
            got = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
            raise NowcastError(f"{type(self.nowcaster).__name__}.predict returned {got}; expected a tensor of "
                               f"shape ({self.num_params},) (one value per parameter element). The model's "
                               "parameters were not changed")
        reason = self._bad_values(pred)
        loss, loss_after = loss_before, None
        if reason is None:
            backup = [self._params[i].detach().clone() for i in self._tracked] if closure is not None else None
            self._write(pred)
            if closure is not None:
                try:
                    with torch.enable_grad():
                        loss_after = closure()
                except BaseException:
                    self._restore(backup)
                    raise
                reason = self._loss_problem(loss_before, loss_after)
                if reason is None:
                    loss = loss_after
                else:
                    self._restore(backup)
        self._finish(s, k, reason, loss_before, loss_after)
        return loss

    def _predict(self, k: int) -> torch.Tensor:
        """``nowcaster.predict`` on the recorded states and the current parameters.
        (:class:`nowcast.distributed.DistributedNiNo` overrides it: one rank predicts, all receive.)"""
        assert self.nowcaster is not None
        states = self._states()
        with torch.no_grad():
            return self.nowcaster.predict(self.graph, states, k)

    def _bad_values(self, pred: torch.Tensor) -> Optional[str]:
        """Why ``pred`` may not be written (NaN, inf, beyond the parameter dtype's range), or None."""
        nan = inf = over = 0
        first = None
        for i in self._written:
            p, o = self._params[i], self._offsets[i]
            v = pred[o: o + p.numel()]
            n_nan, n_inf = int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
            n_over = int((v.abs() > torch.finfo(p.dtype).max).sum()) - n_inf if p.dtype.is_floating_point else 0
            if (n_nan or n_inf or n_over) and first is None:
                first = self.param_names[i] if self.param_names else f"parameter #{i}"
            nan, inf, over = nan + n_nan, inf + n_inf, over + n_over
        if first is None:
            return None
        parts = [f"{c} {w}" for c, w in ((nan, "NaN"), (inf, "inf"), (over, "beyond the parameter dtype's range"))
                 if c]
        return f"the prediction has {', '.join(parts)} value(s) (first in {first!r})"

    def _loss_problem(self, before: Any, after: Any) -> Optional[str]:
        a = _as_float(after)
        if not math.isfinite(a):
            return f"the loss after the nowcast is {a}"
        if self.spike_factor is not None and before is not None:
            b = _as_float(before)
            if a > b + (self.spike_factor - 1) * abs(b):
                return (f"loss spike: {a:.6g} after the nowcast vs {b:.6g} before "
                        f"(spike_factor={self.spike_factor})")
        return None

    @torch.no_grad()
    def _write(self, pred: torch.Tensor) -> None:
        for i in self._written:
            p, o = self._params[i], self._offsets[i]
            p.copy_(pred[o: o + p.numel()].reshape(p.shape))

    @torch.no_grad()
    def _restore(self, backup: Optional[list[torch.Tensor]]) -> None:
        assert backup is not None
        for i, b in zip(self._tracked, backup):
            self._params[i].copy_(b)

    def _skip(self) -> None:
        """End the cycle without a nowcast (``k < min_k``): the base optimizer took the step."""
        st = self.state
        s, k = st["step"], self.schedule.k(st["cycle"], st["step"])  # type: ignore[union-attr]
        st["history"] = []
        st["cycle"] += 1
        st["cycle_start"] = s + 1
        st["nowcasts_skipped"] += 1
        st["last_nowcast"] = {"step": s, "k": k, "accepted": False, "skipped": True, "base_step": True,
                              "reason": f"k={k} < min_k={self.min_k}: skipped, the base optimizer took the step",
                              "loss_before": None, "loss_after": None}

    def _finish(self, s: int, k: int, reason: Optional[str], before: Any = None, after: Any = None) -> None:
        st = self.state
        st["history"] = []
        st["cycle"] += 1
        st["cycle_start"] = s + 1
        st["last_nowcast"] = {"step": s, "k": k, "accepted": reason is None, "reason": reason, "base_step": False,
                              "loss_before": None if before is None else _as_float(before),
                              "loss_after": None if after is None else _as_float(after)}
        if reason is None:
            st["nowcasts"] += 1
            return
        st["nowcasts_rejected"] += 1
        then = ("the base optimizer takes this step instead" if self.on_reject == "base" else
                "this step was skipped; training continues with the base optimizer")
        warnings.warn(f"NiNo: nowcast at step {s} (k={k}) rejected: {reason}. The parameters were restored "
                      f"exactly and {then} (state['nowcasts_rejected'] = {st['nowcasts_rejected']})",
                      NowcastRejectedWarning, stacklevel=5)

    # ---- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The base optimizer's ``state``/``param_groups`` plus ``"nino"``: history and counters."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        base = self.base_optimizer.state_dict()
        st = self.state
        nino = {"version": 1, "num_params": self.num_params, "num_tracked": self.num_tracked, "ctx": self.ctx,
                "step": st["step"], "cycle": st["cycle"], "cycle_start": st["cycle_start"],
                "history": list(st["history"]), "nowcasts": st["nowcasts"],
                "nowcasts_rejected": st["nowcasts_rejected"], "nowcasts_skipped": st["nowcasts_skipped"],
                "last_nowcast": dict(st["last_nowcast"]) if st["last_nowcast"] else None}
        if callable(getattr(self.nowcaster, "run_state", None)):
            nino["nowcaster_run_state"] = self.nowcaster.run_state()
        out = {"state": base["state"], "param_groups": base["param_groups"], "nino": nino}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, out)
            if result is not None:
                out = result
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        if "nino" not in state_dict:
            raise ValueError("not a NiNo state dict (no 'nino' entry); to load a plain base optimizer's state "
                             "use nino.base_optimizer.load_state_dict(...)")
        nino = state_dict["nino"]
        for key, mine in (("num_params", self.num_params), ("num_tracked", self.num_tracked), ("ctx", self.ctx)):
            if nino[key] != mine:
                raise ValueError(f"the state dict was saved with {key}={nino[key]} but this NiNo has {key}={mine}; "
                                 "build the model, the base optimizer (same trainable parameters) and NiNo as "
                                 "in the saved run")
        if any(h.numel() != self.num_tracked for h in nino["history"]) or len(nino["history"]) >= self.ctx:
            raise ValueError("the state dict's history does not fit this model (wrong sizes or too many states)")
        self.base_optimizer.load_state_dict({"state": state_dict["state"],
                                             "param_groups": state_dict["param_groups"]})
        self.state.update({
            "step": int(nino["step"]), "cycle": int(nino["cycle"]), "cycle_start": int(nino["cycle_start"]),
            "history": [h.to(device=self.history_device, dtype=self.history_dtype) for h in nino["history"]],
            "nowcasts": int(nino["nowcasts"]), "nowcasts_rejected": int(nino["nowcasts_rejected"]),
            "nowcasts_skipped": int(nino.get("nowcasts_skipped", 0)),
            "last_nowcast": dict(nino["last_nowcast"]) if nino["last_nowcast"] else None})
        if "nowcaster_run_state" in nino:
            if not callable(getattr(self.nowcaster, "load_run_state", None)):
                raise ValueError(f"the state dict holds a {type(self.nowcaster).__name__ if self.nowcaster else 'None'} "
                                 "nowcaster's run state (a skill gate's decision) that this NiNo's nowcaster cannot "
                                 "take; build NiNo with the nowcaster of the saved run")
            self.nowcaster.load_run_state(nino["nowcaster_run_state"])
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

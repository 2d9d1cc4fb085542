"""Symmetry rules for ATen ops, one function per op family (registered by name in ``RULES``).

An op with no rule pins every axis it touches (see ``neugraph.infer.run``); a rule that meets a
form it does not handle raises, and the driver pins that call too. Pinning is always sound.
"""
from __future__ import annotations

import math

import torch.fx as fx

from .context import Ctx, bind_args, op_name, pin_everything, rule, shapes_of, tensor_leaves
from .spaces import Pin

# ---- elementwise ---------------------------------------------------------------------------------
ELEMENTWISE = """add sub rsub mul div true_divide floor_divide remainder fmod pow relu relu6 gelu silu
sigmoid tanh hardtanh hardswish hardsigmoid mish elu selu celu leaky_relu softplus softsign
log_sigmoid_forward logsigmoid exp exp2 expm1 log log1p log2 log10 sqrt rsqrt neg abs sign sgn square
reciprocal sin cos tan asin acos atan sinh cosh erf erfc erfinv clamp clamp_min clamp_max clip where
masked_fill maximum minimum fmax fmin dropout feature_dropout alpha_dropout feature_alpha_dropout
clone contiguous detach alias lift_fresh_copy _to_copy to type_as copy fill atan2 addcmul addcdiv lerp
floor ceil round trunc frac logical_not logical_and logical_or logical_xor eq ne lt le gt ge isnan
isinf isfinite nan_to_num bitwise_not bitwise_and bitwise_or threshold logit sigmoid_backward
xlogy hypot copysign positive _assert_tensor_metadata __and__ __or__ __xor__ __invert__""".split()


@rule(*ELEMENTWISE, *[n + "_" for n in ELEMENTWISE])
def elementwise(ctx: Ctx, node: fx.Node) -> None:
    out_shape = ctx.shape(node)
    if not isinstance(out_shape, tuple):
        if out_shape is None:
            return
        return pin_everything(ctx, node, "elementwise op with several outputs")
    operands = [a for a in tensor_leaves(node.args) + tensor_leaves(list(node.kwargs.values()))
                if ctx.axes(a) is not None]
    out = []
    r = len(out_shape)
    for d in range(r):
        n = out_shape[d]
        cls = None
        for a in operands:
            sa, xa = ctx.shape(a), ctx.axes(a)
            k = d - (r - len(sa))
            if k < 0 or sa[k] != n or n == 1:
                continue
            cls = xa[k] if cls is None else ctx.unify(cls, xa[k])
        out.append(cls if cls is not None else ctx.sp.new(n))
    ctx.set(node, out)
    sources = [a for a in operands if a.name in ctx.origin and ctx.shape(a) == out_shape]
    if len(sources) == 1:
        ctx.pass_origin(node, sources[0])
    if op_name(node) in ("mul", "div") and len(operands) == 2:
        for a in operands:
            if len(ctx.shape(a)) == 1 and ctx.shape(a)[0] > 1:
                ctx.role(a, kind="scale")
    if op_name(node) in ("add", "sub") and len(operands) == 2:
        for a in operands:
            if len(ctx.shape(a)) == 1 and ctx.shape(a)[0] > 1:
                ctx.role(a, kind="shift")


@rule("native_dropout")
def native_dropout(ctx: Ctx, node: fx.Node) -> None:
    x = ctx.axes(node.args[0])
    ctx.set(node, [list(x), list(x)])


@rule("prelu", "_prelu_kernel")
def prelu(ctx: Ctx, node: fx.Node) -> None:
    x, w = ctx.axes(node.args[0]), node.args[1]
    wa = ctx.axes(w)
    if wa and ctx.shape(w)[0] > 1:
        ctx.unify(wa[0], x[1] if len(x) > 1 else x[0])
        ctx.role(w, kind="scale")
    ctx.set(node, list(x))


# ---- reductions ----------------------------------------------------------------------------------
REDUCE = "sum mean amax amin prod var std var_mean std_mean logsumexp norm linalg_vector_norm all any nansum".split()
INDEXING_REDUCE = "max min argmax argmin median nanmedian mode kthvalue topk sort cummax cummin".split()


def _dims(d, r: int) -> list[int]:
    if d is None:
        return list(range(r))
    if isinstance(d, int):
        d = [d]
    d = list(d)
    if not d:
        return list(range(r))
    return sorted(x % r for x in d)


@rule(*REDUCE, *INDEXING_REDUCE)
def reduction(ctx: Ctx, node: fx.Node) -> None:
    a = bind_args(node)
    x = ctx.axes(a.get("self"))
    if x is None:
        return pin_everything(ctx, node, "reduction of an unknown operand")
    r = len(x)
    name = op_name(node)
    if name in ("max", "min") and "dim" not in a and "other" in a:
        return elementwise(ctx, node)  # max(a, b)
    dims = _dims(a.get("dim"), r) if r else []
    keep = bool(a.get("keepdim", False))
    if name in ("topk", "sort", "cummax", "cummin"):
        dims, keep = [a.get("dim", -1) % r], True
    if name in INDEXING_REDUCE:
        for d in dims:
            ctx.pin(x[d], node, "the op returns positions along this axis")
        if name in ("topk", "sort", "cummax", "cummin"):
            ctx.set(node, [[ctx.sp.new(n, Pin(name, node.name, "sorted positions")) if i in dims else x[i]
                            for i, n in enumerate(s)] for s in ctx.shape(node)])
            return
    out = []
    for i in range(r):
        if i in dims:
            if keep:
                out.append(ctx.sp.new(1))
        else:
            out.append(x[i])
    s = ctx.shape(node)
    if isinstance(s, list):
        ctx.set(node, [list(out) for _ in s])
    else:
        ctx.set(node, out)


@rule("_softmax", "softmax", "_log_softmax", "log_softmax", "_safe_softmax")
def softmax(ctx: Ctx, node: fx.Node) -> None:
    ctx.set(node, list(ctx.axes(node.args[0])))


@rule("cumsum", "cumprod", "logcumsumexp", "flip", "roll", "tril", "triu")
def positional_same_shape(ctx: Ctx, node: fx.Node) -> None:
    a = bind_args(node)
    x = ctx.axes(a["self"])
    r = len(x)
    name = op_name(node)
    if name in ("tril", "triu"):
        dims = [r - 2, r - 1]
    elif name == "roll":
        dims = _dims(a.get("dims"), r)
    else:
        dims = _dims(a.get("dim", a.get("dims")), r)
    for d in dims:
        ctx.pin(x[d], node, "the op depends on positions along this axis")
    ctx.set(node, list(x))


# ---- contractions --------------------------------------------------------------------------------
@rule("linear")
def linear(ctx: Ctx, node: fx.Node) -> None:
    a = bind_args(node)
    x, w, b = a["input"], a["weight"], a.get("bias")
    xa, wa = ctx.axes(x), ctx.axes(w)
    if len(ctx.shape(w)) == 1:
        ctx.unify(xa[-1], wa[0])
        ctx.set(node, xa[:-1])
        return
    ctx.unify(xa[-1], wa[1])
    ctx.set(node, xa[:-1] + [wa[0]])
    ctx.role(w, kind="dense", src=1, dst=0)
    if b is not None and ctx.axes(b) is not None:
        _broadcast_into(ctx, ctx.axes(node), b)
        ctx.role(b, kind="shift")


def _broadcast_into(ctx: Ctx, out: list[int], b: fx.Node) -> None:
    sb, xb = ctx.shape(b), ctx.axes(b)
    for k in range(len(sb)):
        d = len(out) - len(sb) + k
        if d >= 0 and sb[k] != 1 and ctx.sp.size[ctx.sp.find(out[d])] == sb[k]:
            ctx.unify(out[d], xb[k])


def _matmul(ctx: Ctx, node: fx.Node, A: fx.Node, B: fx.Node) -> list[int]:
    sa, sb = ctx.shape(A), ctx.shape(B)
    xa, xb = list(ctx.axes(A)), list(ctx.axes(B))
    va, vb = len(sa) == 1, len(sb) == 1
    if va:
        sa, xa = (1,) + sa, [ctx.sp.new(1)] + xa
    if vb:
        sb, xb = sb + (1,), xb + [ctx.sp.new(1)]
    ctx.unify(xa[-1], xb[-2])
    batch_a, batch_b = xa[:-2], xb[:-2]
    sba, sbb = sa[:-2], sb[:-2]
    r = max(len(batch_a), len(batch_b))
    batch = []
    for d in range(r):
        ka, kb = d - (r - len(batch_a)), d - (r - len(batch_b))
        na = sba[ka] if ka >= 0 else 1
        nb = sbb[kb] if kb >= 0 else 1
        cls = None
        for k, n, xs in ((ka, na, batch_a), (kb, nb, batch_b)):
            if k >= 0 and n != 1:
                cls = xs[k] if cls is None else ctx.unify(cls, xs[k])
        batch.append(cls if cls is not None else ctx.sp.new(max(na, nb)))
    out = batch + ([] if va else [xa[-2]]) + ([] if vb else [xb[-1]])
    na_, nb_ = len(ctx.shape(A)), len(ctx.shape(B))
    if nb_ >= 2:
        ctx.role(B, kind="dense", src=nb_ - 2, dst=nb_ - 1)
    if na_ >= 2:
        ctx.role(A, kind="dense", src=na_ - 1, dst=na_ - 2)
    return out


@rule("mm", "bmm", "matmul", "mv", "dot")
def matmul(ctx: Ctx, node: fx.Node) -> None:
    ctx.set(node, _matmul(ctx, node, node.args[0], node.args[1]))


@rule("addmm", "baddbmm", "addmv", "addbmm")
def addmm(ctx: Ctx, node: fx.Node) -> None:
    bias, A, B = node.args[0], node.args[1], node.args[2]
    out = _matmul(ctx, node, A, B)
    if op_name(node) == "addbmm":
        out = out[1:]
    ctx.set(node, out)
    if ctx.axes(bias) is not None:
        _broadcast_into(ctx, out, bias)
        ctx.role(bias, kind="shift")


@rule("einsum")
def einsum(ctx: Ctx, node: fx.Node) -> None:
    eq, ops = node.args[0], node.args[1]
    if "..." in eq or "->" not in eq:
        return pin_everything(ctx, node, "einsum with ellipsis or implicit output has no rule")
    lhs, rhs = eq.replace(" ", "").split("->")
    letters: dict[str, int] = {}
    for term, op in zip(lhs.split(","), ops):
        xs, ss = ctx.axes(op), ctx.shape(op)
        for ch, x, n in zip(term, xs, ss):
            if n == 1:
                continue
            letters[ch] = x if ch not in letters else ctx.unify(letters[ch], x)
    out_shape = ctx.shape(node)
    ctx.set(node, [letters[ch] if ch in letters and n != 1 else ctx.sp.new(n) for ch, n in zip(rhs, out_shape)])


# ---- axis permutations and reshapes --------------------------------------------------------------
@rule("t", "numpy_T", "transpose", "swapaxes", "swapdims", "permute", "mT", "movedim", "adjoint")
def permute(ctx: Ctx, node: fx.Node) -> None:
    x = ctx.axes(node.args[0])
    r = len(x)
    name = op_name(node)
    order = list(range(r))
    if name in ("t", "numpy_T", "mT", "adjoint"):
        if r >= 2:
            order[-1], order[-2] = order[-2], order[-1]
        if name == "numpy_T":
            order = order[::-1]
    elif name in ("transpose", "swapaxes", "swapdims"):
        i, j = node.args[1] % r, node.args[2] % r
        order[i], order[j] = order[j], order[i]
    elif name == "permute":
        order = [d % r for d in node.args[1]]
    elif name == "movedim":
        src = [d % r for d in (node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]])]
        dst = [d % r for d in (node.args[2] if isinstance(node.args[2], (list, tuple)) else [node.args[2]])]
        rest = [d for d in range(r) if d not in src]
        order = [None] * r
        for s, d in zip(src, dst):
            order[d] = s
        it = iter(rest)
        order = [o if o is not None else next(it) for o in order]
    ctx.set(node, [x[i] for i in order])
    ctx.pass_origin(node, node.args[0], order)


@rule("view", "reshape", "_unsafe_view", "flatten", "unflatten", "view_as", "reshape_as", "squeeze",
      "unsqueeze", "_reshape_alias", "view_copy")
def reshape(ctx: Ctx, node: fx.Node) -> None:
    src = node.args[0]
    x, sin, sout = ctx.axes(src), ctx.shape(src), ctx.shape(node)
    out: list[int | None] = [None] * len(sout)
    ins = [i for i, n in enumerate(sin) if n != 1]
    outs = [j for j, n in enumerate(sout) if n != 1]
    i = j = 0
    while i < len(ins) and j < len(outs):
        gi, gj = [ins[i]], [outs[j]]
        pi, pj = sin[ins[i]], sout[outs[j]]
        while pi != pj:
            if pi < pj:
                i += 1
                gi.append(ins[i])
                pi *= sin[ins[i]]
            else:
                j += 1
                gj.append(outs[j])
                pj *= sout[outs[j]]
        i += 1
        j += 1
        _reshape_group(ctx, node, x, sin, sout, gi, gj, out)
    out = [o if o is not None else ctx.sp.new(sout[k]) for k, o in enumerate(out)]
    out = [_expanded_family(ctx, o) for o in out]
    ctx.set(node, out)
    if [sin[i] for i in ins] == [sout[j] for j in outs]:
        ctx.pass_origin(node, src, [None if sout[j] == 1 else ins[outs.index(j)] for j in range(len(sout))])


def _reshape_group(ctx, node, x, sin, sout, gi, gj, out) -> None:
    sp = ctx.sp
    if len(gi) == 1 and len(gj) == 1:
        out[gj[0]] = x[gi[0]]
    elif len(gj) == 1 and len(gi) == 2 and sp.kind(x[gi[1]]) == "fam" \
            and sp.heads_of(x[gi[1]]) == sp.find(x[gi[0]]):  # heads merged back: the members, in head order
        out[gj[0]] = sp.cat(sp.members(x[gi[1]]))
    elif len(gj) == 1 and len(gi) == 2 and _is_head_axis(sp, x[gi[0]]) and _broadcast_axis(node, gi[1]):
        out[gj[0]] = _repeat_heads(ctx, node, x[gi[0]], sin[gi[1]])
    elif len(gj) == 1:  # merge: outer axis keeps its neurons, inner positions become features
        for d in gi[1:]:
            ctx.pin(x[d], node, "flattened into a channels x positions axis: positions are edge features")
        out[gj[0]] = sp.kron(x[gi[0]], math.prod(sin[d] for d in gi[1:]))
    elif len(gi) == 1:  # split
        c = sp.find(x[gi[0]])
        s = sp.struct.get(c)
        inner = math.prod(sout[d] for d in gj[1:])
        heads = (len(gj) == 2 and sout[gj[0]] > 1 and sout[gj[1]] > 1 and not sp.is_pinned(c)
                 and (s is None or s[0] == "cat"))
        if heads:
            out[gj[0]], out[gj[1]] = _split_heads(ctx, node, c, sout[gj[0]], sout[gj[1]])
        elif s is not None and s[0] == "kron" and s[2] == inner:
            out[gj[0]] = s[1]
            for d in gj[1:]:
                out[d] = sp.new(sout[d], Pin(op_name(node), node.name, "positions of an unflattened axis"))
        elif sp.is_pinned(c):
            for d in gj:
                out[d] = sp.new(sout[d], Pin(op_name(node), node.name, "split of a pinned axis"))
        else:
            pin = Pin(op_name(node), node.name, "reshape splits a neuron axis into several (no rule)")
            sp.pin(c, pin)
            for d in gj:
                out[d] = sp.new(sout[d], pin)
    else:
        pin = Pin(op_name(node), node.name, "reshape regroups several axes (no rule)")
        for d in gi:
            sp.pin(x[d], pin)
        for d in gj:
            out[d] = sp.new(sout[d], pin)


# ---- attention heads -----------------------------------------------------------------------------
def _split_heads(ctx: Ctx, node: fx.Node, c: int, n_heads: int, head_dim: int) -> tuple[int, int]:
    """Split a free axis into ``(heads, head_dim)``: one segment per head, swappable as lanes."""
    sp = ctx.sp
    members = [sp.segment(c, h * head_dim, (h + 1) * head_dim) for h in range(n_heads)]
    heads = [sp.new(1) for _ in range(n_heads)]
    sp.lanes.append([(h, m) for h, m in zip(heads, members)])
    hc = sp.cat(heads)
    ctx.head_axes.add(sp.find(hc))
    return hc, sp.family(hc, members)


def _is_head_axis(sp, a: int) -> bool:
    s = sp.struct.get(sp.find(a))
    return s is not None and s[0] == "cat" and all(sp.size[sp.find(c)] == 1 for c in s[1])


def _broadcast_axis(node: fx.Node, d: int) -> bool:
    """Is ``node``'s input constant along axis ``d`` (an ``expand`` of a size-1 axis)?"""
    src = node.args[0]
    while isinstance(src, fx.Node) and op_name(src) in ("clone", "contiguous", "alias"):
        src = src.args[0]
    if not isinstance(src, fx.Node) or op_name(src) not in ("expand", "expand_copy", "broadcast_to"):
        return False
    inner = src.args[0]
    si = shapes_of(inner.meta.get("val")) if isinstance(inner, fx.Node) else None
    so = shapes_of(src.meta.get("val"))
    if si is None or so is None:
        return False
    k = d - (len(so) - len(si))
    return k < 0 or si[k] == 1


def _repeat_heads(ctx: Ctx, node: fx.Node, heads_axis: int, n_rep: int) -> int:
    """``(kv_heads, n_rep)`` merged into query heads (GQA/MQA ``repeat_kv``): each key/value head
    serves ``n_rep`` consecutive query heads, which move with it (a lane group over kv heads)."""
    sp = ctx.sp
    kv = sp.children(heads_axis)
    rep = [sp.new(1) for _ in range(len(kv) * n_rep)]
    sp.lanes.append([(k, *rep[g * n_rep:(g + 1) * n_rep]) for g, k in enumerate(kv)])
    out = sp.cat(rep)
    ctx.head_axes.add(sp.find(out))
    ctx.repeated[sp.find(heads_axis)] = (out, n_rep)
    return out


def _expanded_family(ctx: Ctx, a: int) -> int:
    """A family whose heads were repeated in this reshape: each member repeated ``n_rep`` times."""
    sp = ctx.sp
    if sp.kind(a) != "fam" or sp.heads_of(a) not in ctx.repeated:
        return a
    out, n_rep = ctx.repeated[sp.heads_of(a)]
    return sp.family(out, [m for m in sp.members(a) for _ in range(n_rep)])


@rule("expand", "expand_as", "broadcast_to", "expand_copy")
def expand(ctx: Ctx, node: fx.Node) -> None:
    x, sin, sout = ctx.axes(node.args[0]), ctx.shape(node.args[0]), ctx.shape(node)
    out = []
    for d, n in enumerate(sout):
        k = d - (len(sout) - len(sin))
        if k >= 0 and sin[k] == n:
            out.append(x[k])
        else:
            out.append(ctx.sp.new(n))  # constant along a broadcast axis: any permutation is fine
    ctx.set(node, out)


# ---- segments ------------------------------------------------------------------------------------
@rule("cat", "concat", "concatenate")
def cat(ctx: Ctx, node: fx.Node) -> None:
    parts = [p for p in node.args[0] if ctx.axes(p) is not None]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    shapes = [ctx.shape(p) for p in parts]
    parts = [p for p, s in zip(parts, shapes) if not (len(s) == 1 and s[0] == 0)]
    out_shape = ctx.shape(node)
    r = len(out_shape)
    dim %= r
    out = []
    for d in range(r):
        if d == dim:
            out.append(ctx.sp.cat([ctx.axes(p)[d] for p in parts]))
            continue
        cls = None
        for p in parts:
            if out_shape[d] == 1:
                break
            cls = ctx.axes(p)[d] if cls is None else ctx.unify(cls, ctx.axes(p)[d])
        out.append(cls if cls is not None else ctx.sp.new(out_shape[d]))
    ctx.set(node, out)


@rule("stack")
def stack(ctx: Ctx, node: fx.Node) -> None:
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    r = len(ctx.shape(parts[0]))
    dim %= r + 1
    base = list(ctx.axes(parts[0]))
    for p in parts[1:]:
        for d in range(r):
            if ctx.shape(p)[d] != 1:
                base[d] = ctx.unify(base[d], ctx.axes(p)[d])
    stacked = ctx.sp.new(len(parts), Pin("stack", node.name, "position of each stacked tensor"))
    ctx.set(node, base[:dim] + [stacked] + base[dim:])


def _segments(ctx: Ctx, node: fx.Node, x: list[int], dim: int, sizes: list[int]) -> None:
    outs, lo = [], 0
    for n in sizes:
        seg = ctx.sp.segment(x[dim], lo, lo + n) if n > 0 else ctx.sp.new(0)
        outs.append(x[:dim] + [seg] + x[dim + 1:])
        lo += n
    ctx.set(node, outs)


@rule("split", "split_with_sizes", "chunk", "unsafe_split", "unsafe_chunk", "tensor_split", "unsafe_split_with_sizes")
def split(ctx: Ctx, node: fx.Node) -> None:
    a = bind_args(node)
    x = ctx.axes(a["self"])
    r = len(x)
    dim = a.get("dim", 0) % r
    sizes = [s[dim] for s in ctx.shape(node)]
    _segments(ctx, node, list(x), dim, sizes)


@rule("unbind")
def unbind(ctx: Ctx, node: fx.Node) -> None:
    x = ctx.axes(node.args[0])
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(x)
    ctx.pin(x[dim], node, "unbind picks fixed positions")
    ctx.set(node, [x[:dim] + x[dim + 1:] for _ in ctx.shape(node)])


@rule("slice", "narrow", "slice_copy")
def slice_(ctx: Ctx, node: fx.Node) -> None:
    a = bind_args(node)
    x = list(ctx.axes(a["self"]))
    sin = ctx.shape(a["self"])
    dim = a.get("dim", 0) % len(x)
    n = sin[dim]
    if op_name(node) == "narrow":
        start, length, step = a["start"], a["length"], 1
        start %= n if start < 0 else n + 1
        end = start + length
    else:
        start, end, step = a.get("start"), a.get("end"), a.get("step", 1)
        start, end, step = slice(start, end, step).indices(n)
    length = ctx.shape(node)[dim]
    if step != 1:
        ctx.pin(x[dim], node, "strided slice picks fixed positions")
        x[dim] = ctx.sp.new(length, Pin(op_name(node), node.name, "strided slice"))
    elif length == n:
        pass
    elif length == 0:
        x[dim] = ctx.sp.new(0)
    else:
        x[dim] = ctx.sp.segment(x[dim], start, start + length)
    ctx.set(node, x)
    if length == n:
        ctx.pass_origin(node, a["self"])


@rule("select")
def select(ctx: Ctx, node: fx.Node) -> None:
    sp = ctx.sp
    x = ctx.axes(node.args[0])
    dim = node.args[1] % len(x)
    out = x[:dim] + x[dim + 1:]
    if _is_head_axis(sp, x[dim]):  # one head picked: its head_dim axis is that head's own space
        hc, n = sp.find(x[dim]), ctx.shape(node.args[0])[dim]
        out = [sp.members(a)[node.args[2] % n] if sp.kind(a) == "fam" and sp.heads_of(a) == hc else a
               for a in out]
    ctx.pin(x[dim], node, "select picks a fixed position")
    ctx.set(node, out)


@rule("index")
def index(ctx: Ctx, node: fx.Node) -> None:
    """Advanced indexing ``x[..., idx, ...]``: indexed axes are pinned, the others pass through."""
    x, idx = ctx.axes(node.args[0]), list(node.args[1])
    sin, sout = ctx.shape(node.args[0]), ctx.shape(node)
    used = [d for d, i in enumerate(idx) if i is not None]
    if not used or used != list(range(used[0], used[-1] + 1)):
        return pin_everything(ctx, node, "advanced indexing with non-adjacent index tensors")
    d0, k = used[0], len(used)
    n_mid = len(sout) - (len(sin) - k)
    pin = Pin("index", node.name, "positions picked by an index tensor")
    for d in used:
        ctx.sp.pin(x[d], pin)
    for i in idx:
        if isinstance(i, fx.Node) and ctx.axes(i) is not None:
            for a in ctx.axes(i):
                ctx.sp.pin(a, pin)
    mid = [ctx.sp.new(n, pin) for n in sout[d0: d0 + n_mid]]
    ctx.set(node, x[:d0] + mid + x[d0 + k:])


@rule("diff")
def diff(ctx: Ctx, node: fx.Node) -> None:
    a = bind_args(node)
    if a.get("prepend") is not None or a.get("append") is not None:
        return pin_everything(ctx, node, "diff with prepend/append")
    x = list(ctx.axes(a["self"]))
    dim = a.get("dim", -1) % len(x)
    ctx.pin(x[dim], node, "differences of neighbouring positions")
    x[dim] = ctx.sp.new(ctx.shape(node)[dim], Pin("diff", node.name, "differences of neighbouring positions"))
    ctx.set(node, x)


@rule("scaled_dot_product_attention")
def sdpa(ctx: Ctx, node: fx.Node) -> None:
    """softmax(q kᵀ + mask) v: q and k share head_dim, k and v share positions, heads stay aligned."""
    sp = ctx.sp
    a = bind_args(node)
    q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
    xq, xk, xv = list(ctx.axes(q)), list(ctx.axes(k)), list(ctx.axes(v))
    sq, sk = ctx.shape(q), ctx.shape(k)
    if a.get("enable_gqa") and len(sq) >= 3 and sk[-3] != sq[-3]:
        n_rep = sq[-3] // sk[-3]
        for xs in (xk, xv):
            if not _is_head_axis(sp, xs[-3]):
                return pin_everything(ctx, node, "grouped-query attention over an axis that is not a heads axis")
            xs[-3] = _repeat_heads(ctx, node, xs[-3], n_rep)
        xk[:] = [_expanded_family(ctx, x) for x in xk]
        xv[:] = [_expanded_family(ctx, x) for x in xv]
        sk = sk[:-3] + (sq[-3],) + sk[-2:]
    ops = [(xq, ctx.shape(q)), (xk, sk), (xv, sk[:-1] + ctx.shape(v)[-1:])]
    r = max(len(s) for _, s in ops)
    batch = []
    for d in range(r - 2):
        cls = None
        for xs, s in ops:
            kk = d - (r - len(s))
            if kk >= 0 and s[kk] != 1:
                cls = xs[kk] if cls is None else ctx.unify(cls, xs[kk])
        batch.append(cls if cls is not None else sp.new(1))
    ctx.unify(xq[-1], xk[-1])
    ctx.unify(xk[-2], xv[-2])
    if mask is not None or a.get("is_causal"):
        ctx.pin(xq[-2], node, "attention mask distinguishes query positions")
        ctx.pin(xk[-2], node, "attention mask distinguishes key positions")
    if isinstance(mask, fx.Node) and ctx.axes(mask) is not None:
        for m in ctx.axes(mask):
            ctx.pin(m, node, "attention mask")
    ctx.set(node, batch + [xq[-2], xv[-1]])


@rule("index_select", "gather", "take_along_dim")
def index_select(ctx: Ctx, node: fx.Node) -> None:
    a = bind_args(node)
    x = ctx.axes(a["self"])
    dim = a.get("dim", 0) % len(x)
    ctx.pin(x[dim], node, "gather by index picks positions along this axis")
    out_shape = ctx.shape(node)
    if len(out_shape) == len(x) and op_name(node) == "index_select":
        out = list(x)
        out[dim] = ctx.sp.new(out_shape[dim], Pin(op_name(node), node.name, "gathered positions"))
        ctx.set(node, out)
    else:
        pin_everything(ctx, node, "gather by data")


@rule("embedding")
def embedding(ctx: Ctx, node: fx.Node) -> None:
    w, idx = node.args[0], node.args[1]
    wa, ia = ctx.axes(w), ctx.axes(idx)
    ctx.pin(wa[0], node, "embedding rows are gathered by token id")
    ctx.set(node, list(ia) + [wa[1]])
    ctx.role(w, kind="embedding", src=0, dst=1)


# ---- convolution and pooling ---------------------------------------------------------------------
@rule("conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d",
      "conv_transpose3d")
def conv(ctx: Ctx, node: fx.Node) -> None:
    a = bind_args(node)
    x, w, b = a["input"], a["weight"], a.get("bias")
    xa, wa, sx, sw = ctx.axes(x), ctx.axes(w), ctx.shape(x), ctx.shape(w)
    transposed = bool(a.get("transposed", False)) or op_name(node).startswith("conv_transpose")
    groups = int(a.get("groups", 1))
    nsp = len(sw) - 2
    batched = len(sx) == nsp + 2
    c_in = 1 if batched else 0
    out_shape = ctx.shape(node)
    stride = list(a.get("stride", [1])) or [1]
    padding = a.get("padding", [0])
    pointwise = (all(k == 1 for k in sw[2:]) and all(s == 1 for s in stride) and not transposed
                 and (padding in ("valid", "same") or all(p == 0 for p in padding)))
    kernel_pin = Pin(op_name(node), node.name, "kernel position (an edge feature)")
    for d in range(2, len(sw)):
        ctx.sp.pin(wa[d], kernel_pin)
    spatial_out = []
    for d in range(nsp):
        xi, n_out = xa[c_in + 1 + d], out_shape[c_in + 1 + d]
        if pointwise:
            spatial_out.append(xi)
        else:
            ctx.pin(xi, node, "convolution mixes positions along this axis")
            spatial_out.append(ctx.sp.new(n_out, Pin(op_name(node), node.name, "convolution output position")))
    lead = xa[:c_in]
    w_in, w_out = (0, 1) if transposed else (1, 0)
    if groups == 1:
        ctx.unify(xa[c_in], wa[w_in])
        cout = wa[w_out]
        ctx.role(w, kind="conv", src=w_in, dst=w_out, features=list(range(2, len(sw))))
    elif transposed:
        pin_everything(ctx, node, "grouped transposed convolution has no rule")
        return
    else:
        cout = _grouped(ctx, node, xa[c_in], w, wa, groups)
    if b is not None and ctx.axes(b) is not None:
        ctx.unify(ctx.axes(b)[0], cout)
        ctx.role(b, kind="shift")
    ctx.set(node, lead + [cout] + spatial_out)


def _grouped(ctx: Ctx, node: fx.Node, x_c: int, w: fx.Node, wa: list[int], groups: int) -> int:
    """Grouped convolution: per-group input and output segments that may be permuted as blocks."""
    sp = ctx.sp
    sw = ctx.shape(w)
    mo, mi = sw[0] // groups, sw[1]
    ins = [sp.segment(x_c, g * mi, (g + 1) * mi) for g in range(groups)]
    outs = [sp.new(mo) for _ in range(groups)]
    cout = sp.cat(outs)
    sp.unify(wa[0], cout)
    sp.lanes.append([(i, o) for i, o in zip(ins, outs)])
    if isinstance(w, fx.Node) and w.name in ctx.origin and ctx.origin[w.name][1][:2] == [0, 1]:
        name = ctx.origin[w.name][0]
        ctx.grouped[name] = (1, ins, mo)
        ctx.role(w, kind="conv", src=1, dst=0, features=list(range(2, len(sw))))
    else:
        pin = Pin(op_name(node), node.name, "grouped weight that is not a plain parameter")
        sp.pin(wa[1], pin)
        for i in ins:
            sp.pin(i, pin)
    return cout


POOL = """max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices
max_pool3d_with_indices avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d
adaptive_avg_pool3d _adaptive_avg_pool2d _adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
adaptive_max_pool3d lp_pool1d lp_pool2d""".split()


@rule(*POOL)
def pool(ctx: Ctx, node: fx.Node) -> None:
    name = op_name(node)
    nsp = int(next(ch for ch in name if ch.isdigit()))
    x, sx = ctx.axes(node.args[0]), ctx.shape(node.args[0])
    shp = ctx.shape(node)
    out_shape = shp[0] if isinstance(shp, list) else shp
    lead = x[: len(sx) - nsp]
    global_pool = all(n == 1 for n in out_shape[len(sx) - nsp:])
    spatial = []
    for d in range(len(sx) - nsp, len(sx)):
        if global_pool:
            spatial.append(ctx.sp.new(1))
        else:
            ctx.pin(x[d], node, "pooling mixes positions along this axis")
            spatial.append(ctx.sp.new(out_shape[d], Pin(name, node.name, "pooled position")))
    out = lead + spatial
    if isinstance(shp, list):
        ctx.set(node, [out] + [[*lead, *(ctx.sp.new(n, Pin(name, node.name, "pooling indices"))
                                        for n in s[len(lead):])] for s in shp[1:]])
    else:
        ctx.set(node, out)


@rule("upsample_nearest1d", "upsample_nearest2d", "upsample_bilinear2d", "upsample_linear1d",
      "upsample_bicubic2d", "_upsample_nearest_exact2d", "pixel_shuffle", "pixel_unshuffle", "im2col", "col2im")
def spatial_mix(ctx: Ctx, node: fx.Node) -> None:
    x, sx, so = ctx.axes(node.args[0]), ctx.shape(node.args[0]), ctx.shape(node)
    if op_name(node) in ("pixel_shuffle", "pixel_unshuffle", "im2col", "col2im"):
        return pin_everything(ctx, node, "moves channels into positions")
    nsp = len(sx) - 2
    for d in range(2, len(sx)):
        ctx.pin(x[d], node, "resampling mixes positions")
    ctx.set(node, x[:2] + [ctx.sp.new(n, Pin(op_name(node), node.name, "resampled position")) for n in so[2:]])
    del nsp


@rule("constant_pad_nd", "pad", "reflection_pad1d", "reflection_pad2d", "replication_pad1d",
      "replication_pad2d", "reflection_pad3d", "replication_pad3d", "circular_pad2d")
def pad(ctx: Ctx, node: fx.Node) -> None:
    x, sx, so = ctx.axes(node.args[0]), ctx.shape(node.args[0]), ctx.shape(node)
    out = []
    for d, (n_in, n_out) in enumerate(zip(sx, so)):
        if n_in == n_out:
            out.append(x[d])
        else:
            ctx.pin(x[d], node, "padding shifts positions")
            out.append(ctx.sp.new(n_out, Pin(op_name(node), node.name, "padded position")))
    ctx.set(node, out)


# ---- normalisation -------------------------------------------------------------------------------
@rule("batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
      "_native_batch_norm_legit_no_training", "_batch_norm_with_update", "_batch_norm_no_update",
      "_batch_norm_with_update_functional", "instance_norm")
def batch_norm(ctx: Ctx, node: fx.Node) -> None:
    a = bind_args(node)
    x = ctx.axes(a["input"])
    c = x[1] if len(x) > 1 else x[0]
    _bind_affine(ctx, a, c, ("weight", "bias", "running_mean", "running_var"))
    _norm_outputs(ctx, node, x, c)


def _bind_affine(ctx: Ctx, a: dict, c: int, keys: tuple[str, ...]) -> None:
    """Bind a norm's per-channel tensors to the channel space ``c``; weight scales, bias shifts."""
    for key in keys:
        t = a.get(key)
        if ctx.axes(t) is not None:
            ctx.unify(ctx.axes(t)[0], c)
    ctx.role(a.get("weight"), kind="scale")
    ctx.role(a.get("bias"), kind="shift")


def _norm_outputs(ctx: Ctx, node: fx.Node, x: list[int], c: int | None) -> None:
    shp = ctx.shape(node)
    xs = ctx.shape(node.args[0])

    def one(s):
        if s == xs:
            return list(x)
        if c is not None and len(s) == 1 and s[0] == ctx.sp.size[ctx.sp.find(c)] and s[0] > 1:
            return [c]
        if len(s) == len(xs) and all(n == 1 or n == m for n, m in zip(s, xs)):
            return [x[i] if s[i] == xs[i] and s[i] != 1 else ctx.sp.new(s[i]) for i in range(len(s))]
        return ctx.fresh(s, Pin(op_name(node), node.name, "saved statistics"))

    ctx.set(node, [one(s) for s in shp] if isinstance(shp, list) else one(shp))


@rule("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm")
def layer_norm(ctx: Ctx, node: fx.Node) -> None:
    a = bind_args(node)
    x = ctx.axes(a["input"])
    k = len(a["normalized_shape"])
    for key in ("weight", "bias"):
        t = a.get(key)
        ta = ctx.axes(t)
        if ta is not None:
            for i in range(k):
                ctx.unify(ta[i], x[len(x) - k + i])
    ctx.role(a.get("weight"), kind="scale")
    ctx.role(a.get("bias"), kind="shift")
    _norm_outputs(ctx, node, x, None)


@rule("group_norm", "native_group_norm")
def group_norm(ctx: Ctx, node: fx.Node) -> None:
    a = bind_args(node)
    x = ctx.axes(a["input"])
    groups = int(a.get("num_groups", a.get("group", 1)))
    c = x[1]
    n = ctx.sp.size[ctx.sp.find(c)]
    if groups > 1:
        segs = [ctx.sp.segment(c, g * (n // groups), (g + 1) * (n // groups)) for g in range(groups)]
        ctx.sp.lanes.append([(s,) for s in segs])
    _bind_affine(ctx, a, c, ("weight", "bias"))
    _norm_outputs(ctx, node, x, None)


# ---- constants, plumbing -------------------------------------------------------------------------
UNIFORM = "zeros ones full empty zeros_like ones_like full_like empty_like new_zeros new_ones new_full new_empty scalar_tensor empty_strided".split()
VARYING = "arange linspace logspace rand randn randint rand_like randn_like randint_like eye tensor bernoulli normal randperm".split()


@rule(*UNIFORM)
def uniform_constant(ctx: Ctx, node: fx.Node) -> None:
    ctx.set_fresh_like_output(node)


@rule(*VARYING)
def varying_constant(ctx: Ctx, node: fx.Node) -> None:
    ctx.set_fresh_like_output(node, Pin(op_name(node), node.name, "a constant that varies along this axis"))


@rule("getitem")
def getitem(ctx: Ctx, node: fx.Node) -> None:
    src, i = node.args
    v = ctx.ax.get(src.name) if isinstance(src, fx.Node) else None
    if isinstance(v, list) and isinstance(i, int) and i < len(v) and isinstance(v[i], list):
        ctx.set(node, v[i])
    elif shapes_of(node.meta.get("val")) is not None:
        pin_everything(ctx, node, "item of an output with unknown axes")

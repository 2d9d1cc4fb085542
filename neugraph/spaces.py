"""Union-find over axis spaces.

Every tensor axis in a captured graph gets a space id. Unifying two ids says "these axes must be
permuted together". A space is either plain (one block of interchangeable neurons), a ``cat`` of
child spaces (segments, from concatenation, split or grouped convolution), or a ``kron`` of an
outer space and a fixed number of inner positions (a flattened ``channels x positions`` axis whose
positions are pinned and become edge features). A plain space can be *pinned* (no permutation
allowed); every pin carries a reason. Unification of incompatible structures falls back to pinning,
which is always sound.

Attention heads: splitting a free axis into ``(heads, head_dim)`` makes the flat axis a ``cat`` of one
segment per head (the *members*) and a lane group that swaps heads; the ``heads`` axis of the split
tensor is a ``cat`` of size-1 spaces (one per head, so head axes unify head by head) and the
``head_dim`` axis is a *family* ``("fam", heads, [members])``: its permutation is member ``h``'s in
head ``h``. A pin that reaches members through a family is *uniform* (the same for every head, e.g.
a rotary table broadcast over heads): it forbids permutations inside a head but not head swaps.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Pin:
    """Why a space admits no permutation."""

    op: str
    node: str
    reason: str
    uniform: bool = False  # applied identically to every head (through a family): heads may still swap


@dataclass
class Spaces:
    parent: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    pins: dict[int, list[Pin]] = field(default_factory=dict)  # leaf root -> reasons
    struct: dict[int, tuple] = field(default_factory=dict)  # root -> ("cat", [ids]) | ("kron", outer, n) | ("fam", heads, [members])
    lanes: list[list[tuple[int, ...]]] = field(default_factory=list)  # blocks that may be swapped

    # ---- basics -------------------------------------------------------------------------------
    def new(self, n: int, pin: Pin | None = None) -> int:
        i = len(self.parent)
        self.parent.append(i)
        self.size.append(int(n))
        if pin is not None:
            self.pins[i] = [pin]
        return i

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def kind(self, a: int) -> str:
        s = self.struct.get(self.find(a))
        return "plain" if s is None else s[0]

    def children(self, a: int) -> list[int]:
        s = self.struct[self.find(a)]
        assert s[0] == "cat"
        return [self.find(c) for c in s[1]]

    # ---- pins ---------------------------------------------------------------------------------
    def pin(self, a: int, pin: Pin) -> None:
        """Pin ``a`` and everything it is made of."""
        a = self.find(a)
        s = self.struct.get(a)
        if s is None:
            self.pins.setdefault(a, []).append(pin)
        elif s[0] == "cat":
            for c in s[1]:
                self.pin(c, pin)
        elif s[0] == "fam":
            uniform = Pin(pin.op, pin.node, pin.reason, uniform=True)
            for c in s[2]:
                self.pin(c, uniform)
        else:
            self.pin(s[1], pin)

    def is_pinned(self, a: int) -> bool:
        a = self.find(a)
        s = self.struct.get(a)
        if s is None:
            return a in self.pins
        if s[0] == "cat":
            return all(self.is_pinned(c) for c in s[1])
        if s[0] == "fam":
            return all(self.is_pinned(c) for c in s[2])
        return self.is_pinned(s[1])

    def blocks_swap(self, leaf: int) -> bool:
        """True when ``leaf`` carries a pin that forbids moving it as a whole block (lane swaps)."""
        return any(not p.uniform for p in self.pins.get(self.find(leaf), []))

    # ---- structure ----------------------------------------------------------------------------
    def cat(self, parts: list[int]) -> int:
        """A new space that is the concatenation of ``parts``."""
        parts = [self._dekron(self._defam(p, "head_dim axes concatenated")) for p in parts
                 if self.size[self.find(p)] > 0]
        if len(parts) == 1:
            return parts[0]
        i = self.new(sum(self.size[p] for p in parts))
        self.pins.pop(i, None)
        self.struct[i] = ("cat", parts)
        return i

    def kron(self, outer: int, inner: int) -> int:
        """A flattened ``outer x inner`` axis; the caller pins the ``inner`` positions."""
        outer = self._dekron(self.find(outer))
        if inner == 1:
            return outer
        i = self.new(self.size[outer] * inner)
        self.pins.pop(i, None)
        self.struct[i] = ("kron", outer, inner)
        return i

    def family(self, heads: int, members: list[int]) -> int:
        """The ``head_dim`` axis of a tensor split into heads: member ``h`` is head ``h``'s space."""
        i = self.new(self.size[self.find(members[0])])
        self.struct[i] = ("fam", heads, list(members))
        return i

    def members(self, a: int) -> list[int]:
        s = self.struct[self.find(a)]
        assert s[0] == "fam"
        return [self.find(m) for m in s[2]]

    def heads_of(self, a: int) -> int:
        s = self.struct[self.find(a)]
        assert s[0] == "fam"
        return self.find(s[1])

    def _defam(self, a: int, why: str = "head_dim axis used in a way that differs from head to head") -> int:
        """A plain pinned stand-in for a family (its members are pinned uniformly)."""
        a = self.find(a)
        if self.kind(a) != "fam":
            return a
        pin = Pin("heads", "", why)
        self.pin(a, pin)
        return self.new(self.size[a], pin)

    def _dekron(self, a: int) -> int:
        """Turn a kron space into a plain pinned one (used where segments meet flattening)."""
        s = self.struct.get(a)
        if s is not None and s[0] == "kron":
            pin = Pin("cat/split", "", "segments of a flattened channels x positions axis")
            self.pin(s[1], pin)
            del self.struct[a]
            self.pins.setdefault(a, []).append(pin)
        return a

    def boundaries(self, a: int) -> list[int]:
        a = self.find(a)
        s = self.struct.get(a)
        out, off = [0], 0
        if s is not None and s[0] == "cat":
            for c in s[1]:
                off += self.size[self.find(c)]
                out.append(off)
        else:
            out.append(self.size[a])
        return out

    def split(self, a: int, offsets) -> None:
        """Make ``a`` a cat whose top-level boundaries include every offset in ``offsets``."""
        a = self.find(a)
        n = self.size[a]
        offsets = sorted({int(o) for o in offsets if 0 < o < n})
        if not offsets:
            return
        if self.struct.get(a, ("plain",))[0] == "kron":
            self._dekron(a)
        if self.kind(a) == "fam":
            self._defam(a, "head_dim axis split")
            return
        s = self.struct.get(a)
        if s is None:
            cuts = [0] + offsets + [n]
            pinned = self.pins.pop(a, None)
            kids = []
            for lo, hi in zip(cuts, cuts[1:]):
                k = self.new(hi - lo)
                if pinned is not None:
                    self.pins[k] = list(pinned)
                kids.append(k)
            self.struct[a] = ("cat", kids)
            return
        kids, off, new_kids = s[1], 0, []
        for c in kids:
            c = self.find(c)
            m = self.size[c]
            inner = [o - off for o in offsets if off < o < off + m]
            if inner:
                self.split(c, inner)
                new_kids.extend(self.children(c))
            else:
                new_kids.append(c)
            off += m
        self.struct[a] = ("cat", new_kids)

    def segment(self, a: int, lo: int, hi: int) -> int:
        """The space covering positions ``[lo, hi)`` of ``a`` (creating boundaries as needed)."""
        a = self.find(a)
        if lo == 0 and hi == self.size[a]:
            return a
        if self.kind(a) == "fam":  # e.g. rotate_half slicing head_dim: the same slice in every head
            self._defam(a, "head_dim axis sliced")
            return self.new(hi - lo, Pin("heads", "", "slice of a head_dim axis"))
        self.split(a, [lo, hi])
        kids = self.children(a)
        off, inside = 0, []
        for c in kids:
            if lo <= off and off + self.size[c] <= hi:
                inside.append(c)
            off += self.size[c]
        if len(inside) == 1:
            return inside[0]
        group = self.cat(inside)
        # nest the group so later users of ``a`` see the same segment
        new_kids, placed = [], False
        for c in kids:
            if c in inside:
                if not placed:
                    new_kids.append(group)
                    placed = True
            else:
                new_kids.append(c)
        self.struct[a] = ("cat", new_kids)
        return group

    # ---- unification --------------------------------------------------------------------------
    def unify(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self.size[a] != self.size[b]:
            raise ValueError(f"internal error: unifying spaces of sizes {self.size[a]} and {self.size[b]}")
        sa, sb = self.struct.get(a), self.struct.get(b)
        if (sa is not None and sa[0] == "fam") or (sb is not None and sb[0] == "fam"):
            return self._unify_family(a, b)
        if sa is None and sb is None:
            return self._union(a, b)
        if sa is None or sb is None:
            plain, other = (a, b) if sa is None else (b, a)
            reasons = self.pins.pop(plain, None)
            if reasons is not None:
                for p in reasons or [Pin("unify", "", "tied to a pinned axis")]:
                    self.pin(other, p)
            self.parent[plain] = other
            return other
        if sa[0] == "cat" and sb[0] == "cat":
            cuts = sorted(set(self.boundaries(a)) | set(self.boundaries(b)))
            self.split(a, cuts)
            self.split(b, cuts)
            for x, y in zip(self.children(a), self.children(b)):
                self.unify(x, y)
            self.parent[b] = a
            return self.find(a)
        if sa[0] == "kron" and sb[0] == "kron" and sa[2] == sb[2]:
            self.unify(sa[1], sb[1])
            self.parent[b] = a
            return self.find(a)
        # incompatible structures: pin both (sound), keep one
        pin = Pin("unify", "", f"incompatible axis structures ({sa[0]} vs {sb[0]})")
        self._dekron(a)
        self._dekron(b)
        self.pin(a, pin)
        self.pin(b, pin)
        if self.struct.get(b) is None:
            self.pins.pop(b, None)
            self.parent[b] = a
            return a
        self.pins.pop(a, None)
        self.parent[a] = b
        return b

    def _unify_family(self, a: int, b: int) -> int:
        sa, sb = self.struct.get(a), self.struct.get(b)
        if sa is not None and sb is not None and sa[0] == "fam" and sb[0] == "fam" and len(sa[2]) == len(sb[2]):
            self.unify(sa[1], sb[1])  # heads stay aligned ...
            for x, y in zip(sa[2], sb[2]):  # ... and head h's neurons are tied head by head
                self.unify(x, y)
            self.parent[b] = a
            return self.find(a)
        # a family meets an axis shared by all heads (a rotary table, a per-head_dim weight) or a
        # family of another head count: no permutation inside heads (sound); heads may still swap.
        # The two are not linked: both are pinned, which satisfies the tie.
        fam, other = (a, b) if sa is not None and sa[0] == "fam" else (b, a)
        reasons = self.pin_reasons(other) if self.kind(other) != "fam" else []
        pin = Pin("heads", "", "head_dim axis tied to an axis shared by all heads" if not reasons
                  else f"head_dim axis tied to a pinned axis ({reasons[0].reason})")
        self.pin(fam, pin)
        if self.kind(other) == "fam":
            self.pin(other, pin)
        else:
            self.pin(self._dekron(other), Pin("heads", "", "tied to the head_dim axis of every head"))
        return fam

    def _union(self, a: int, b: int) -> int:
        pa, pb = self.pins.pop(a, None), self.pins.pop(b, None)
        self.parent[b] = a
        if pa is not None or pb is not None:
            self.pins[a] = (pa or []) + (pb or [])
        return a

    # ---- reading ------------------------------------------------------------------------------
    def leaves(self, a: int) -> list[int]:
        """Plain spaces making up ``a`` in order (a kron counts through its outer space)."""
        a = self.find(a)
        s = self.struct.get(a)
        if s is None:
            return [a]
        if s[0] == "kron":
            return self.leaves(s[1])
        out = []
        for c in (s[2] if s[0] == "fam" else s[1]):
            out.extend(self.leaves(c))
        return out

    def pin_reasons(self, a: int) -> list[Pin]:
        out = []
        for leaf in self.leaves(a):
            out.extend(self.pins.get(leaf, []))
        return out

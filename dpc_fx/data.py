"""Data for the experiments: CIFAR-10/100 from the standard files, and text that ships with
Python for a character-level language model. Nothing is downloaded.

CIFAR comes in two standard layouts, both read here from a folder the user names:

* python pickles: ``cifar-10-batches-py/data_batch_1`` .. ``data_batch_5`` and ``test_batch``
  (dicts with ``b"data"``, an N x 3072 uint8 array, and ``b"labels"``);
  ``cifar-100-python/train`` and ``test`` (``b"fine_labels"``);
* binary records: ``cifar-10-batches-bin/data_batch_1.bin`` .. ``data_batch_5.bin`` and
  ``test_batch.bin`` (1 label byte + 3072 pixel bytes per image);
  ``cifar-100-binary/train.bin`` and ``test.bin`` (coarse label byte, fine label byte,
  3072 pixel bytes).

Images come back as uint8 tensors ``(N, 3, 32, 32)``; :func:`cifar_batches` normalises and
augments them batch by batch, on whatever device they live on.

>>> corpus = char_corpus()
>>> len(corpus.vocab), corpus.decode(corpus.encode("Return the sum."))
(97, 'Return the sum.')
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import pickle
import string
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from dpc_fx.demo import Split
from dpc_fx.errors import DPCError

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "CharCorpus",
    "DataError",
    "char_corpus",
    "cifar",
    "cifar_batches",
    "stdlib_text",
]

CIFARName = Literal["cifar10", "cifar100"]
IMAGE_BYTES = 3 * 32 * 32

# Per-channel statistics of the CIFAR-10 training images (the usual normalisation).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class DataError(DPCError, FileNotFoundError):
    """A data folder lacks the files expected, or a file is not in the expected format."""


@dataclass(frozen=True)
class _Layout:
    folder: str
    train: tuple[str, ...]
    test: str
    label_bytes: int  # binary layout only: label bytes before each image (fine label last)
    label_key: bytes  # pickle layout only


_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_LAYOUTS: dict[tuple[str, str], _Layout] = {
    ("cifar10", "python"): _Layout("cifar-10-batches-py", _BATCHES, "test_batch", 0, b"labels"),
    ("cifar10", "binary"): _Layout(
        "cifar-10-batches-bin",
        tuple(f"{b}.bin" for b in _BATCHES),
        "test_batch.bin",
        1,
        b"",
    ),
    ("cifar100", "python"): _Layout("cifar-100-python", ("train",), "test", 0, b"fine_labels"),
    ("cifar100", "binary"): _Layout("cifar-100-binary", ("train.bin",), "test.bin", 2, b""),
}


def cifar(root: str | Path, name: CIFARName = "cifar10") -> tuple[Split, Split]:
    """The train and test splits of CIFAR-10 or CIFAR-100 (fine labels) from ``root``.

    ``root`` may be the folder holding the files or its parent (where the archive was
    unpacked, e.g. ``~/data`` with ``~/data/cifar-10-batches-py`` inside); the python and the
    binary layout are both accepted.

    Raises:
        DataError: no complete set of files in either layout under ``root``; the message
            lists what was expected where.
    """
    if name not in ("cifar10", "cifar100"):
        raise DataError(f"cifar: name={name!r} is not 'cifar10' or 'cifar100'.")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"cifar: {root} is not a folder; pass the folder where the {name} archive was "
            f"unpacked (it holds {_LAYOUTS[name, 'python'].folder}/ or "
            f"{_LAYOUTS[name, 'binary'].folder}/)."
        )
    tried: list[str] = []
    for fmt in ("python", "binary"):
        layout = _LAYOUTS[name, fmt]
        for folder in (root / layout.folder, root):
            files = [folder / f for f in (*layout.train, layout.test)]
            if all(f.is_file() for f in files):
                read = _read_pickle if fmt == "python" else _read_binary
                train = _concat([read(f, layout) for f in files[:-1]])
                return train, read(files[-1], layout)
            missing = [f.name for f in files if not f.is_file()]
            tried.append(
                f"  {folder}: "
                + ("missing " + ", ".join(missing) if folder.is_dir() else "no such folder")
            )
    listing = "\n".join(dict.fromkeys(tried))
    raise DataError(
        f"cifar: no {name} data under {root}. Expected the python files "
        f"({', '.join((*_LAYOUTS[name, 'python'].train, _LAYOUTS[name, 'python'].test))}) or "
        f"the binary files ({', '.join((*_LAYOUTS[name, 'binary'].train, _LAYOUTS[name, 'binary'].test))}), "
        f"in {root} or in its subfolder {_LAYOUTS[name, 'python'].folder}/ or "
        f"{_LAYOUTS[name, 'binary'].folder}/. Looked in:\n{listing}"
    )


def _concat(splits: list[Split]) -> Split:
    return Split(torch.cat([s.x for s in splits]), torch.cat([s.y for s in splits]))


def _read_binary(path: Path, layout: _Layout) -> Split:
    record = layout.label_bytes + IMAGE_BYTES
    raw = path.read_bytes()
    if not raw or len(raw) % record:
        raise DataError(
            f"cifar: {path} has {len(raw)} bytes, not a whole number of {record}-byte records "
            f"({layout.label_bytes} label byte(s) + {IMAGE_BYTES} pixels); is it a "
            f"{layout.folder} file?"
        )
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, record)
    labels = data[:, layout.label_bytes - 1].long()  # the fine label is the last label byte
    return Split(data[:, layout.label_bytes :].reshape(-1, 3, 32, 32).clone(), labels)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays only: a data file must not run code."""

    ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: Path, layout: _Layout) -> Split:
    try:
        with path.open("rb") as f:
            entry = _ArrayUnpickler(io.BufferedReader(f), encoding="bytes").load()
        data, labels = entry[b"data"], entry[layout.label_key]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"cifar: {path} is not a CIFAR python batch (a pickled dict with b'data' and "
            f"{layout.label_key!r}): {type(e).__name__}: {e}"
        ) from e
    x = torch.as_tensor(data, dtype=torch.uint8)
    if x.dim() != 2 or x.shape[1] != IMAGE_BYTES or x.shape[0] != len(labels):
        raise DataError(
            f"cifar: {path}: b'data' has shape {tuple(x.shape)}, expected "
            f"({len(labels)}, {IMAGE_BYTES})."
        )
    return Split(x.reshape(-1, 3, 32, 32).clone(), torch.as_tensor(labels, dtype=torch.long))


def cifar_batches(
    data: Split,
    size: int,
    *,
    generator: torch.Generator | None = None,
    augment: bool = True,
) -> Iterator[tuple[Tensor, Tensor]]:
    """One pass over ``data`` (uint8 images) in float batches, normalised with the CIFAR
    mean and std; with ``augment``, shuffled, randomly shifted by up to 4 pixels (a 4-pixel
    zero-padded random crop) and flipped left-right half the time, as in He et al.

    Runs on the device ``data`` is on; ``generator`` (on the CPU) makes it reproducible.

    >>> images = Split(torch.zeros(5, 3, 32, 32, dtype=torch.uint8), torch.arange(5))
    >>> [tuple(x.shape) for x, _ in cifar_batches(images, 2, augment=False)]
    [(2, 3, 32, 32), (2, 3, 32, 32), (1, 3, 32, 32)]
    """
    device = data.x.device
    mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1)
    n = len(data.y)
    order = torch.randperm(n, generator=generator) if augment else torch.arange(n)
    for i in range(0, n, size):
        idx = order[i : i + size].to(device)
        x = (data.x[idx].float() / 255 - mean) / std
        if augment:
            b = len(idx)
            shift = torch.randint(0, 9, (2, b), generator=generator).to(device)
            flip = (torch.rand(b, generator=generator) < 0.5).to(device)
            padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
            rows = (shift[0].view(b, 1) + torch.arange(32, device=device)).view(b, 1, 32, 1)
            cols = (shift[1].view(b, 1) + torch.arange(32, device=device)).view(b, 1, 1, 32)
            cols = torch.where(flip.view(b, 1, 1, 1), cols.flip(-1), cols)
            batch = torch.arange(b, device=device).view(b, 1, 1, 1)
            channel = torch.arange(3, device=device).view(1, 3, 1, 1)
            x = padded[batch, channel, rows, cols]
        yield x, data.y[idx]


# Pure-Python standard-library modules with plenty of prose in their docstrings; all ship
# with every CPython build (no optional C extensions).
STDLIB_MODULES = (
    "argparse",
    "ast",
    "calendar",
    "collections",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "difflib",
    "doctest",
    "email.message",
    "enum",
    "fractions",
    "functools",
    "gettext",
    "http.client",
    "inspect",
    "logging",
    "mailbox",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "pprint",
    "pydoc",
    "random",
    "shutil",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "tokenize",
    "traceback",
    "typing",
    "unittest.case",
    "unittest.mock",
    "urllib.parse",
    "warnings",
    "zipfile",
)


def stdlib_text(modules: tuple[str, ...] = STDLIB_MODULES) -> str:
    """English prose that ships with Python: the docstrings of ``modules`` and of their
    public classes, functions and methods, in a fixed order (about 410,000 characters on CPython 3.11;
    the exact text depends on the Python version).

    Raises:
        DataError: the docstrings were stripped (``python -OO``).
    """
    parts: list[str] = []
    with warnings.catch_warnings():  # reading typing.io and the like warns
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in modules:
            parts += _docstrings(importlib.import_module(name))
    text = "\n\n".join(p for p in parts if p)
    if len(text) < 10_000:
        raise DataError(
            "stdlib_text: the standard library's docstrings are missing (is Python running "
            "with -OO?); run without -OO or pass text of your own to char_corpus."
        )
    return text


def _docstrings(module: types.ModuleType) -> list[str]:
    """The docstrings of ``module`` and of its public classes, functions and methods."""
    parts = [inspect.getdoc(module) or ""]
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        doc = inspect.getdoc(obj)
        parts.append(doc or "")
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items()):
                member_doc = inspect.getdoc(member) if callable(member) else None
                if not member_name.startswith("_") and member_doc and member_doc != doc:
                    parts.append(member_doc)
    return parts


@dataclass(frozen=True)
class CharCorpus:
    """A text as token ids over a fixed alphabet, split into train and validation.

    Attributes:
        train, val: 1-D int64 tensors of token ids.
        vocab: the alphabet (``string.printable`` less ``\\r``, ``\\x0b``, ``\\x0c``); other
            characters read as ``?``.
        digest: the first 12 hex digits of the text's SHA-256, to tell corpora apart.
    """

    train: Tensor
    val: Tensor
    vocab: str
    digest: str

    def encode(self, text: str) -> Tensor:
        index = {c: i for i, c in enumerate(self.vocab)}
        unknown = index["?"]
        return torch.tensor([index.get(c, unknown) for c in text], dtype=torch.long)

    def decode(self, ids: Tensor) -> str:
        return "".join(self.vocab[i] for i in ids.tolist())

    def __repr__(self) -> str:
        return (
            f"CharCorpus(train={len(self.train):,} chars, val={len(self.val):,} chars, "
            f"vocab={len(self.vocab)}, digest={self.digest})"
        )


VOCAB = "".join(c for c in string.printable if c not in "\r\x0b\x0c")


def char_corpus(text: str | None = None, *, block: int = 2048, val_every: int = 10) -> CharCorpus:
    """``text`` (default: :func:`stdlib_text`) as a :class:`CharCorpus`: cut into blocks of
    ``block`` characters, every ``val_every``-th block goes to validation, the rest to
    training, so both halves sample the whole text.
    """
    if text is None:
        text = stdlib_text()
    index = {c: i for i, c in enumerate(VOCAB)}
    unknown = index["?"]
    ids = torch.tensor([index.get(c, unknown) for c in text], dtype=torch.long)
    blocks = list(ids.split(block))
    val = [b for i, b in enumerate(blocks) if i % val_every == val_every - 1]
    train = [b for i, b in enumerate(blocks) if i % val_every != val_every - 1]
    if not val or not train:
        raise DataError(
            f"char_corpus: {len(text)} characters make fewer than {val_every} blocks of "
            f"{block}; give more text or a smaller block."
        )
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return CharCorpus(torch.cat(train), torch.cat(val), VOCAB, digest)

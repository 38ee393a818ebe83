"""experiments.data: CIFAR files in both standard layouts (written here, tiny), batches, text."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dpc_fx.errors import DPCError
from experiments.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    DataError,
    Split,
    char_corpus,
    cifar,
    cifar_batches,
    digits,
    stdlib_text,
)

N = 3  # images per file


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def _write_pickle(path: Path, data: np.ndarray, labels: list[int], key: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump({b"data": data, key: labels, b"batch_label": b"x"}, f)


def write_cifar10_python(root: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    written = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data, labels = _images(N, i), [(i + j) % 10 for j in range(N)]
        _write_pickle(folder / name, data, labels, b"labels")
        written[name] = (data, labels)
    return written


def write_binary(folder: Path, names: list[str], label_bytes: int) -> dict[str, tuple]:
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, name in enumerate(names):
        data = _images(N, 10 + i)
        labels = np.array([[(j + 1) % 20, (30 + i + 7 * j) % 100][-label_bytes:] for j in range(N)])
        records = np.concatenate([labels.astype(np.uint8), data], axis=1)
        (folder / name).write_bytes(records.tobytes())
        written[name] = (data, labels[:, -1].tolist())
    return written


def test_cifar10_python_layout(tmp_path: Path) -> None:
    written = write_cifar10_python(tmp_path)
    train, test = cifar(tmp_path, "cifar10")
    assert train.x.shape == (5 * N, 3, 32, 32) and train.x.dtype == torch.uint8
    assert test.x.shape == (N, 3, 32, 32) and test.y.dtype == torch.long
    data, labels = written["data_batch_2"]
    assert torch.equal(train.x[N : 2 * N].reshape(N, -1), torch.from_numpy(data))
    assert train.y[N : 2 * N].tolist() == labels
    # Row layout: 1024 red, then green, then blue values, each row-major 32 x 32.
    assert int(test.x[1, 2, 3, 4]) == int(written["test_batch"][0][1, 2 * 1024 + 3 * 32 + 4])
    assert test.y.tolist() == written["test_batch"][1]


def test_root_may_be_the_batch_folder_itself(tmp_path: Path) -> None:
    write_cifar10_python(tmp_path)
    train, _ = cifar(tmp_path / "cifar-10-batches-py")
    assert len(train.y) == 5 * N


def test_cifar10_binary_layout(tmp_path: Path) -> None:
    names = [f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]
    written = write_binary(tmp_path / "cifar-10-batches-bin", names, 1)
    train, test = cifar(tmp_path, "cifar10")
    assert train.x.shape == (5 * N, 3, 32, 32)
    data, labels = written["test_batch.bin"]
    assert torch.equal(test.x.reshape(N, -1), torch.from_numpy(data))
    assert test.y.tolist() == labels


def test_cifar100_binary_reads_fine_labels(tmp_path: Path) -> None:
    written = write_binary(tmp_path / "cifar-100-binary", ["train.bin", "test.bin"], 2)
    train, test = cifar(tmp_path, "cifar100")
    assert train.y.tolist() == written["train.bin"][1]  # the second label byte: fine
    assert max(train.y.tolist() + test.y.tolist()) >= 20  # not the coarse labels (< 20)
    assert torch.equal(train.x.reshape(N, -1), torch.from_numpy(written["train.bin"][0]))


def test_cifar100_python_layout(tmp_path: Path) -> None:
    for i, name in enumerate(("train", "test")):
        labels = [50 + i + j for j in range(N)]
        _write_pickle(tmp_path / "cifar-100-python" / name, _images(N, i), labels, b"fine_labels")
    train, test = cifar(tmp_path, "cifar100")
    assert train.y.tolist() == [50, 51, 52] and test.y.tolist() == [51, 52, 53]


def test_missing_files_name_what_is_expected_where(tmp_path: Path) -> None:
    write_cifar10_python(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(
        DataError, match=r"(?s)no cifar10 data under .*batches-py: missing data_batch_4\n"
    ) as info:
        cifar(tmp_path)
    assert isinstance(info.value, DPCError) and isinstance(info.value, FileNotFoundError)
    assert "cifar-10-batches-bin" in str(info.value)


def test_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"is not a folder; pass the folder where the cifar100"):
        cifar(tmp_path / "nope", "cifar100")


def test_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"name='svhn' is not 'cifar10' or 'cifar100'"):
        cifar(tmp_path, "svhn")  # type: ignore[arg-type]


def test_truncated_binary_file(tmp_path: Path) -> None:
    names = [f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]
    write_binary(tmp_path, names, 1)
    (tmp_path / "data_batch_3.bin").write_bytes(b"\x00" * 3000)
    with pytest.raises(DataError, match=r"data_batch_3.bin has 3000 bytes, not a whole number"):
        cifar(tmp_path)


class _Exploit:
    """Unpickling this would create a file: what a malicious data file could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


def test_pickles_cannot_run_code(tmp_path: Path) -> None:
    write_cifar10_python(tmp_path)
    marker = tmp_path / "pwned"
    with (tmp_path / "cifar-10-batches-py" / "test_batch").open("wb") as f:
        pickle.dump({b"data": _Exploit(marker), b"labels": [0]}, f)
    with pytest.raises(DataError, match=r"not a CIFAR python batch.*refusing to load"):
        cifar(tmp_path)
    assert not marker.exists()


def test_pickle_with_wrong_shape(tmp_path: Path) -> None:
    write_cifar10_python(tmp_path)
    _write_pickle(
        tmp_path / "cifar-10-batches-py" / "test_batch", _images(2, 0)[:, :100], [0, 1], b"labels"
    )
    with pytest.raises(DataError, match=r"b'data' has shape \(2, 100\), expected \(2, 3072\)"):
        cifar(tmp_path)


def test_cifar_batches_normalise_without_augmentation() -> None:
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    data = Split(x, torch.arange(5))
    batches = list(cifar_batches(data, 2, augment=False))
    assert [len(y) for _, y in batches] == [2, 2, 1]
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    expected = (x.float() / 255 - mean) / std
    assert torch.allclose(torch.cat([b for b, _ in batches]), expected)


def test_cifar_batches_augment_is_a_shifted_crop_or_its_mirror() -> None:
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    data = Split(x, torch.arange(6))
    plain = torch.cat([b for b, _ in cifar_batches(data, 6, augment=False)])
    padded = torch.nn.functional.pad(plain, (4, 4, 4, 4))
    out, labels = next(cifar_batches(data, 6, generator=torch.Generator().manual_seed(1)))
    for image, label in zip(out, labels.tolist(), strict=True):
        crops = [
            c
            for dy in range(9)
            for dx in range(9)
            for c in (padded[label, :, dy : dy + 32, dx : dx + 32],)
            for c in (c, c.flip(-1))
        ]
        assert any(torch.equal(image, c) for c in crops)
    again, _ = next(cifar_batches(data, 6, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(out, again)


def test_stdlib_text_is_prose_and_fixed() -> None:
    text = stdlib_text()
    assert len(text) > 100_000 and "Return" in text
    assert stdlib_text() == text


def test_char_corpus_round_trip_and_split() -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(100)) + "é"
    corpus = char_corpus(text, block=10, val_every=5)
    assert len(corpus.train) + len(corpus.val) == len(text)
    assert len(corpus.val) == 20  # blocks 4 and 9 of 0..10
    assert corpus.decode(corpus.val[:10]) == text[40:50]
    assert corpus.decode(corpus.encode("héllo\n")) == "h?llo\n"
    assert len(corpus.vocab) == 97 and "\t" in corpus.vocab
    assert "vocab=97" in repr(corpus)


def test_char_corpus_too_short() -> None:
    with pytest.raises(DataError, match=r"make fewer than 10 blocks of 2048"):
        char_corpus("short text")


def test_digits_splits() -> None:
    train, test = digits()
    assert train.x.shape == (1400, 1, 8, 8) and test.x.shape == (397, 1, 8, 8)
    everything = torch.cat([train.x, test.x])
    assert abs(float(everything.mean())) < 1e-5 and abs(float(everything.std()) - 1) < 1e-5
    assert sorted(set(train.y.tolist())) == list(range(10))
    again = digits()[1]
    assert torch.equal(again.x, test.x) and torch.equal(again.y, test.y)  # a fixed split
    big, _ = digits(size=32, channels=3, test=97)
    assert big.x.shape == (1700, 3, 32, 32)
    assert torch.equal(big.x[:, 0], big.x[:, 2])

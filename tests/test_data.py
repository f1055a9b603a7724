"""The reference app's data: real digits, flwr-datasets partitions, held-out test set."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from flwr_guard.apps.digits.data import (
    cached_partition_arrays,
    dataset_from_arrays,
    held_out_arrays,
    load_digits_dataset,
    load_partition,
    load_test_set,
    make_partitioner,
    split_train_test,
)


def _rows(dataset) -> Counter[bytes]:
    """Multiset of examples (image bytes + label): digits has a few exact duplicates."""
    images = np.asarray(dataset["image"]).reshape(len(dataset), -1)
    labels = np.asarray(dataset["label"]).astype(np.float32)[:, None]
    return Counter(row.tobytes() for row in np.concatenate([images, labels], axis=1))


def test_digits_are_the_real_1797_images() -> None:
    ds = load_digits_dataset()
    assert len(ds) == 1797
    images = np.asarray(ds["image"])
    assert images.shape == (1797, 1, 8, 8) and images.dtype == np.float32
    assert images.min() == 0.0 and images.max() == 1.0
    assert sorted(set(np.asarray(ds["label"]).tolist())) == list(range(10))


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
@pytest.mark.parametrize("num_partitions", [2, 8])
def test_partitions_are_disjoint_and_cover_the_pool(kind: str, num_partitions: int) -> None:
    pool, test = split_train_test(load_digits_dataset(), test_fraction=0.2, seed=7)
    partitioner = make_partitioner(kind, num_partitions, alpha=0.3, seed=7)
    partitioner.dataset = pool
    partitions = [partitioner.load_partition(i) for i in range(num_partitions)]
    assert sum(len(p) for p in partitions) == len(pool) == 1797 - len(test)
    union: Counter[bytes] = Counter()
    for partition in partitions:
        union += _rows(partition)
    # Same multiset as the pool: every example in exactly one partition.
    assert union == _rows(pool)
    # The server's test set is handed to no node (beyond exact duplicates in digits).
    shared = set(_rows(test)) & set(union)
    assert len(shared) <= 2


def test_load_partition_is_one_node_of_the_same_split() -> None:
    pool, _ = split_train_test(load_digits_dataset(), test_fraction=0.2, seed=42)
    partitioner = make_partitioner("dirichlet", 4, alpha=0.5, seed=42)
    partitioner.dataset = pool
    expected = partitioner.load_partition(2)
    got = load_partition(2, 4, "dirichlet", alpha=0.5, seed=42, test_fraction=0.2)
    np.testing.assert_array_equal(np.asarray(got["label"]), np.asarray(expected["label"]))


def test_dirichlet_is_skewed_and_iid_is_balanced() -> None:
    def label_share(kind: str) -> float:
        part = load_partition(0, 4, kind, alpha=0.1, seed=3)
        counts = np.bincount(np.asarray(part["label"]), minlength=10)
        return counts.max() / counts.sum()

    assert label_share("iid") < 0.2
    assert label_share("dirichlet") > 0.3


def test_test_set_is_stratified_and_held_out() -> None:
    test = load_test_set(test_fraction=0.2, seed=42)
    assert len(test) == 360
    counts = np.bincount(np.asarray(test["label"]), minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38


def test_cached_partition_matches_and_is_reused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FLWR_GUARD_CACHE_DIR", str(tmp_path))
    images, labels = cached_partition_arrays(1, 3, "dirichlet", 0.5, 5, 0.2)
    assert len(list(tmp_path.glob("partition-*.npz"))) == 1
    again = cached_partition_arrays(1, 3, "dirichlet", 0.5, 5, 0.2)
    reference = load_partition(1, 3, "dirichlet", 0.5, 5, 0.2)
    np.testing.assert_array_equal(images, np.asarray(reference["image"]))
    np.testing.assert_array_equal(labels, again[1])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: make_partitioner("shards", 2), "unknown partitioner"),
        (lambda: make_partitioner("dirichlet", 2, alpha=0.0), "alpha"),
        (lambda: make_partitioner("iid", 0), "num_partitions"),
        (lambda: load_partition(4, 4), "out of range"),
        (lambda: split_train_test(load_digits_dataset(), 1.5, 0), "test-fraction"),
        (lambda: dataset_from_arrays(np.zeros((3, 8, 8)), np.zeros(2)), "labels"),
        (lambda: dataset_from_arrays(np.full((2, 8, 8), 2.0), np.zeros(2)), "[0, 1]"),
    ],
)
def test_bad_input_is_refused_clearly(call, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call()


@pytest.mark.parametrize(("num_partitions", "seed", "test_fraction"), [(1, 42, 0.2), (3, 42, 0.2), (7, 5, 0.3), (10, 1, 0.1)])
def test_iid_partitions_without_flwr_datasets_are_flwr_datasets_partitions(
        tmp_path, monkeypatch, num_partitions: int, seed: int, test_fraction: float) -> None:
    """The NumPy IID path (what the deployment images run, without `datasets`) gives
    exactly the rows of flwr-datasets' IidPartitioner, in the same order."""
    monkeypatch.setenv("FLWR_GUARD_CACHE_DIR", str(tmp_path))
    pool, _ = split_train_test(load_digits_dataset(), test_fraction=test_fraction, seed=seed)
    for i in range(num_partitions):
        images, labels = cached_partition_arrays(i, num_partitions, "iid", 0.5, seed, test_fraction)
        partitioner = make_partitioner("iid", num_partitions)
        partitioner.dataset = pool
        expected = partitioner.load_partition(i)
        np.testing.assert_array_equal(images, np.asarray(expected["image"], dtype=np.float32))
        np.testing.assert_array_equal(labels, np.asarray(expected["label"]))
        assert images.dtype == np.float32 and labels.dtype == np.int64


def test_held_out_arrays_are_the_test_set() -> None:
    images, labels = held_out_arrays(0.2, 42)
    test = load_test_set(0.2, 42)
    np.testing.assert_array_equal(images, np.asarray(test["image"]))
    np.testing.assert_array_equal(labels, np.asarray(test["label"]))
    assert images.shape == (360, 1, 8, 8) and images.dtype == np.float32


BLOCK_DATASETS = """
import importlib.abc
import sys

BLOCKED = ("datasets", "flwr_datasets", "pyarrow", "pandas")


class NotInstalled(importlib.abc.MetaPathFinder):  # as in the deployment images
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, NotInstalled())
"""


def test_the_deployed_app_loads_its_data_without_datasets_and_dirichlet_names_the_extra(tmp_path) -> None:
    """Without `datasets`, flwr-datasets, pyarrow and pandas (the deployment images), the
    IID partition and the held-out set load; the Dirichlet partitioning raises an
    ImportError naming the `data` extra. Control: the same Dirichlet call succeeds when
    they are importable (test_cached_partition_matches_and_is_reused)."""
    code = BLOCK_DATASETS + """
import os
os.environ["FLWR_GUARD_CACHE_DIR"] = sys.argv[1]
from flwr_guard.apps.digits.data import cached_partition_arrays, held_out_arrays
images, labels = cached_partition_arrays(1, 3, "iid", 0.5, 42, 0.2)
test_images, _ = held_out_arrays(0.2, 42)
print(images.shape, test_images.shape)
try:
    cached_partition_arrays(1, 3, "dirichlet", 0.5, 42, 0.2)
except ImportError as error:
    print("ImportError:", error)
assert not set(BLOCKED) & set(sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "(479, 1, 8, 8) (360, 1, 8, 8)"
    assert lines[1].startswith("ImportError: partitioner 'dirichlet' needs the 'datasets' package")
    assert 'pip install "flwr-guard[data]"' in lines[1]

"""Data for the reference app: scikit-learn's digits, partitioned with flwr-datasets.

Nothing is downloaded: :func:`load_digits_dataset` reads the 1797 real 8x8 digit images
that scikit-learn ships. Users' own data goes through the same path by building a
``datasets.Dataset`` with :func:`dataset_from_arrays`.

The deployed app (:func:`node_partition_arrays`, :func:`held_out_arrays`) needs neither
``datasets`` nor ``flwr_datasets`` for the IID partitioning: :func:`iid_partition_indices`
computes exactly the split of flwr-datasets' ``IidPartitioner`` (contiguous shards,
``datasets.Dataset.shard``) with NumPy, so the deployment images leave out ``datasets``
and pyarrow (flwr-guard's ``data`` extra). The Dirichlet partitioning and the
``Dataset`` functions import flwr-datasets and raise :class:`ImportError` naming the
extra when it is not installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

if TYPE_CHECKING:  # imported lazily: `datasets` and `flwr_datasets` take seconds to load
    from datasets import Dataset
    from flwr_datasets.partitioner import Partitioner
    from torch.utils.data import TensorDataset

PartitionerKind = Literal["iid", "dirichlet"]
IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
CACHE_ENV = "FLWR_GUARD_CACHE_DIR"
DATA_EXTRA_HINT = "install flwr-guard's data extra: pip install \"flwr-guard[data]\""


def _require_datasets(what: str) -> None:
    """Raise ImportError naming the fix when flwr-datasets (and ``datasets``) is missing."""
    import importlib.util

    for module in ("datasets", "flwr_datasets"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            raise ImportError(f"{what} needs the {module!r} package, which is not installed: {DATA_EXTRA_HINT}"
                              " (the deployment images leave it out; they partition with 'iid' only)")


def dataset_from_arrays(images: np.ndarray, labels: np.ndarray) -> Dataset:
    """Build the app's ``datasets.Dataset`` from arrays.

    Args:
        images: ``(N, H, W)`` or ``(N, 1, H, W)``, any real dtype, values in ``[0, 1]``.
        labels: ``(N,)`` integer class ids.

    Returns:
        A Dataset with columns ``image`` (float32, ``1 x H x W``) and ``label`` (int).

    Raises:
        ValueError: if the shapes disagree or pixel values fall outside ``[0, 1]``.
    """
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels)
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (N, H, W) or (N, 1, H, W), got {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be ({images.shape[0]},), got {labels.shape}")
    if images.size and (images.min() < 0.0 or images.max() > 1.0):
        raise ValueError("pixel values must lie in [0, 1]")
    _require_datasets("dataset_from_arrays")
    import datasets

    datasets.disable_progress_bars()
    return datasets.Dataset.from_dict(
        {IMAGE_COLUMN: images, LABEL_COLUMN: labels.astype(np.int64)}
    ).with_format("numpy")


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as arrays, without ``datasets``.

    Returns:
        ``(images, labels)``: float32 ``(1797, 1, 8, 8)`` in ``[0, 1]`` and int64 ``(1797,)``,
        the same values as :func:`load_digits_dataset`'s columns.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32)[:, None], digits.target.astype(np.int64)


def load_digits_dataset() -> Dataset:
    """Load scikit-learn's bundled digits: 1797 images of ``1 x 8 x 8`` in ``[0, 1]``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return dataset_from_arrays(digits.images / 16.0, digits.target)


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted row indices of the federated pool and of the held-out test set: the
    stratified split of :func:`split_train_test` (scikit-learn's ``train_test_split``).

    Raises:
        ValueError: if ``test_fraction`` is not in ``(0, 1)``.
    """
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test-fraction must be in (0, 1), got {test_fraction}")
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=np.asarray(labels)
    )
    return np.sort(train_idx), np.sort(test_idx)


def split_train_test(
    dataset: Dataset, test_fraction: float, seed: int
) -> tuple[Dataset, Dataset]:
    """Stratified split into the federated pool and the server's held-out test set.

    Raises:
        ValueError: if ``test_fraction`` is not in ``(0, 1)``.
    """
    train_idx, test_idx = split_indices(np.asarray(dataset[LABEL_COLUMN]), test_fraction, seed)
    return dataset.select(train_idx), dataset.select(test_idx)


def iid_partition_indices(num_examples: int, num_partitions: int, partition_id: int) -> np.ndarray:
    """Row indices of one IID partition, without flwr-datasets: contiguous shards, the
    first ``num_examples % num_partitions`` one row longer, as flwr-datasets'
    ``IidPartitioner`` cuts them (``datasets.Dataset.shard(contiguous=True)``).

    Raises:
        ValueError: if ``num_partitions < 1`` or ``partition_id`` is not in ``[0, num_partitions)``.
    """
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} out of range for {num_partitions} partitions")
    return np.array_split(np.arange(num_examples), num_partitions)[partition_id]


def make_partitioner(
    kind: PartitionerKind, num_partitions: int, alpha: float = 0.5, seed: int = 42
) -> Partitioner:
    """Return a flwr-datasets partitioner: IID, or Dirichlet over labels with ``alpha``.

    Raises:
        ValueError: for an unknown ``kind``, ``num_partitions < 1`` or ``alpha <= 0``.
    """
    _require_datasets("make_partitioner")
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if kind == "dirichlet":
        if alpha <= 0:
            raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=LABEL_COLUMN,
            alpha=alpha,
            min_partition_size=5,
            self_balancing=True,
            seed=seed,
        )
    raise ValueError(f"unknown partitioner {kind!r}: use 'iid' or 'dirichlet'")


def load_partition(
    partition_id: int,
    num_partitions: int,
    kind: PartitionerKind = "iid",
    alpha: float = 0.5,
    seed: int = 42,
    test_fraction: float = 0.2,
    dataset: Dataset | None = None,
) -> Dataset:
    """Return one node's partition of the federated pool (never the server's test set).

    Raises:
        ValueError: if ``partition_id`` is not in ``[0, num_partitions)``.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id {partition_id} out of range for {num_partitions} partitions"
        )
    pool, _ = split_train_test(dataset or load_digits_dataset(), test_fraction, seed)
    partitioner = make_partitioner(kind, num_partitions, alpha, seed)
    partitioner.dataset = pool
    return partitioner.load_partition(partition_id)


def load_test_set(
    test_fraction: float = 0.2, seed: int = 42, dataset: Dataset | None = None
) -> Dataset:
    """Return the server's held-out test set (disjoint from every partition)."""
    _, test = split_train_test(dataset or load_digits_dataset(), test_fraction, seed)
    return test


def held_out_arrays(test_fraction: float = 0.2, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """:func:`load_test_set` of the digits as arrays, without ``datasets``.

    Returns:
        ``(images, labels)``: float32 ``(n, 1, 8, 8)`` in ``[0, 1]`` and int64 ``(n,)``.
    """
    images, labels = digits_arrays()
    _, test_idx = split_indices(labels, test_fraction, seed)
    return images[test_idx], labels[test_idx]


def cached_partition_arrays(
    partition_id: int,
    num_partitions: int,
    kind: PartitionerKind = "iid",
    alpha: float = 0.5,
    seed: int = 42,
    test_fraction: float = 0.2,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`load_partition` of the digits as arrays, cached on disk.

    A deployed ClientApp process lives for one message; loading ``datasets`` and
    ``flwr_datasets`` costs it several seconds each time, so the partition is
    materialised once per (partitioning, node) under ``$FLWR_GUARD_CACHE_DIR``
    (default ``~/.cache/flwr-guard``) and read back with NumPy afterwards. ``iid``
    partitions are cut with NumPy (:func:`iid_partition_indices`, the same rows as
    flwr-datasets' ``IidPartitioner``), so they need neither ``datasets`` nor flwr-datasets.

    Raises:
        ImportError: for ``dirichlet`` without flwr-datasets installed (the fix named).

    Returns:
        ``(images, labels)``: float32 ``(n, 1, 8, 8)`` in ``[0, 1]`` and int64 ``(n,)``.
    """
    key = json.dumps(
        [partition_id, num_partitions, kind, alpha, seed, test_fraction, "digits-v1"]
    )
    cache_dir = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "flwr-guard"))
    path = cache_dir / f"partition-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if path.exists():
        with np.load(path) as arrays:
            return arrays[IMAGE_COLUMN], arrays[LABEL_COLUMN]
    if kind == "iid":
        all_images, all_labels = digits_arrays()
        pool, _ = split_indices(all_labels, test_fraction, seed)
        rows = pool[iid_partition_indices(len(pool), num_partitions, partition_id)]
        images, labels = all_images[rows], all_labels[rows]
    else:
        if kind != "dirichlet":
            raise ValueError(f"unknown partitioner {kind!r}: use 'iid' or 'dirichlet'")
        _require_datasets(f"partitioner {kind!r}")
        partition = load_partition(partition_id, num_partitions, kind, alpha, seed, test_fraction)
        images = np.asarray(partition[IMAGE_COLUMN], dtype=np.float32)
        labels = np.asarray(partition[LABEL_COLUMN], dtype=np.int64)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Several ClientApp processes may race here: write aside, then rename atomically.
    with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".npz", delete=False) as tmp:
        columns: dict[str, Any] = {IMAGE_COLUMN: images, LABEL_COLUMN: labels}
        np.savez(tmp, **columns)
    os.replace(tmp.name, path)
    return images, labels


def _partitioner_kind(name: str) -> PartitionerKind:
    if name in ("iid", "dirichlet"):
        return cast(PartitionerKind, name)
    raise ValueError(f"run config partitioner must be 'iid' or 'dirichlet', got {name!r}")


def node_partition_arrays(
    run_config: Mapping[str, Any], node_config: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`cached_partition_arrays` of the node described by a Flower context's
    ``node_config`` (``partition-id``, ``num-partitions``) under the app's
    ``run_config`` (``partitioner``, ``dirichlet-alpha``, ``seed``, ``test-fraction``)."""
    return cached_partition_arrays(
        partition_id=int(node_config["partition-id"]),
        num_partitions=int(node_config["num-partitions"]),
        kind=_partitioner_kind(str(run_config["partitioner"])),
        alpha=float(run_config["dirichlet-alpha"]),
        seed=int(run_config["seed"]),
        test_fraction=float(run_config["test-fraction"]),
    )


def to_tensor_dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    """Wrap arrays as a ``TensorDataset`` of (float32 ``N x 1 x H x W``, int64 ``N``)."""
    import torch
    from torch.utils.data import TensorDataset

    return TensorDataset(
        torch.as_tensor(np.asarray(images), dtype=torch.float32),
        torch.as_tensor(np.asarray(labels), dtype=torch.int64),
    )

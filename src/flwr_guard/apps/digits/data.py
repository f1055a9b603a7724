"""Data for the reference app: scikit-learn's digits, partitioned with flwr-datasets.

Nothing is downloaded: :func:`load_digits_dataset` reads the 1797 real 8x8 digit images
that scikit-learn ships. Users' own data goes through the same path by building a
``datasets.Dataset`` with :func:`dataset_from_arrays`.
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
    import datasets

    datasets.disable_progress_bars()
    return datasets.Dataset.from_dict(
        {IMAGE_COLUMN: images, LABEL_COLUMN: labels.astype(np.int64)}
    ).with_format("numpy")


def load_digits_dataset() -> Dataset:
    """Load scikit-learn's bundled digits: 1797 images of ``1 x 8 x 8`` in ``[0, 1]``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return dataset_from_arrays(digits.images / 16.0, digits.target)


def split_train_test(
    dataset: Dataset, test_fraction: float, seed: int
) -> tuple[Dataset, Dataset]:
    """Stratified split into the federated pool and the server's held-out test set.

    Raises:
        ValueError: if ``test_fraction`` is not in ``(0, 1)``.
    """
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test-fraction must be in (0, 1), got {test_fraction}")
    indices = np.arange(len(dataset))
    train_idx, test_idx = train_test_split(
        indices,
        test_size=test_fraction,
        random_state=seed,
        stratify=np.asarray(dataset[LABEL_COLUMN]),
    )
    return dataset.select(np.sort(train_idx)), dataset.select(np.sort(test_idx))


def make_partitioner(
    kind: PartitionerKind, num_partitions: int, alpha: float = 0.5, seed: int = 42
) -> Partitioner:
    """Return a flwr-datasets partitioner: IID, or Dirichlet over labels with ``alpha``.

    Raises:
        ValueError: for an unknown ``kind``, ``num_partitions < 1`` or ``alpha <= 0``.
    """
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
    (default ``~/.cache/flwr-guard``) and read back with NumPy afterwards.

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

"""Real data for the audit's sweep: scikit-learn's bundled digits, at 8x8 or upsampled.

Nothing is downloaded. Upsampling (e.g. to 28x28, the size of DLG's MNIST experiments)
is bilinear (``torch.nn.functional.interpolate``, ``align_corners=False``), clamped to
``[0, 1]``.
"""

from __future__ import annotations

import torch


def digits(image_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits: float32 ``(1797, 1, S, S)`` in ``[0, 1]`` and int64 ``(1797,)``.

    Raises:
        ValueError: for ``image_size < 8``.
    """
    from sklearn.datasets import load_digits

    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
    bunch = load_digits()
    images = torch.as_tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)
    if image_size != 8:
        images = torch.nn.functional.interpolate(
            images, size=(image_size, image_size), mode="bilinear", align_corners=False
        ).clamp(0.0, 1.0)
    return images, torch.as_tensor(bunch.target, dtype=torch.long)


def client_pool(
    image_size: int = 8, size: int = 300, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's data for the sweep: ``size`` digits drawn without replacement.

    Raises:
        ValueError: for ``size`` outside ``[2, 1797]``.
    """
    images, labels = digits(image_size)
    if not 2 <= size <= images.shape[0]:
        raise ValueError(f"pool size must be in [2, {images.shape[0]}], got {size}")
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    return images[order[:size]], labels[order[:size]]

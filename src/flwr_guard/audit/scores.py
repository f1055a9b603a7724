"""How close a reconstruction is to the data it came from.

- PSNR and SSIM: torchmetrics (``peak_signal_noise_ratio``,
  ``structural_similarity_index_measure``) on images in ``[0, 1]`` (``data_range=1``).
  SSIM's Gaussian window is 11x11 with σ = 1.5 (Wang et al. 2004) when the image is
  large enough, and otherwise the largest odd size that fits, with σ scaled alike
  (7x7, σ ≈ 0.95 on 8x8 digits). Rule for small inputs: SSIM is *skipped* (NaN, "not
  applicable") for anything that is not ``(N, C, H, W)`` or whose smaller side is below
  3 pixels (a 1xD row has no 2-D structure to compare); PSNR is defined for any shape.
- Vectors (tabular rows, embeddings): :mod:`flwr_guard.audit.vector_scores`.
- Matching: when an update comes from several images, each victim is paired with one
  reconstruction by the assignment of least total MSE (Hungarian algorithm,
  ``scipy.optimize.linear_sum_assignment``) — the most favourable pairing, as an audit
  should assume.
- Identification: a victim is *identified* when the nearest sample (L2 in pixel space)
  to its reconstruction among the client's data is the victim itself, and the
  reconstruction's PSNR against the victim beats the mean image's by at least
  ``margin_db`` (default 1 dB). The second condition keeps a reconstruction that learnt
  nothing from being "identified" by chance: a mean-like image has some nearest
  sample, and a small random step away from the mean lands nearest to the victim once
  in a few hundred tries — often enough, over several attacks and victims, to turn a
  noise-only update into a false "leaks".
- Label accuracy: the attack's label for the reconstruction paired with the victim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

MAX_PSNR_DB = 100.0
IDENTIFICATION_MARGIN_DB = 1.0


def ssim_applies(shape: tuple[int, ...]) -> bool:
    """Whether SSIM is computed for samples of ``shape`` ``(C, H, W)``: rank 3 and both
    sides at least 3 (the rule of the module docstring)."""
    return len(shape) == 3 and min(shape[-2:]) >= 3


def ssim_window(height: int, width: int) -> tuple[int, float]:
    """``(kernel_size, sigma)`` of an SSIM Gaussian window that fits ``height x width``.

    Raises:
        ValueError: for images smaller than 3x3 (:func:`ssim` skips those instead).
    """
    side = min(height, width, 11)
    if side % 2 == 0:
        side -= 1
    if side < 3:
        raise ValueError(f"SSIM needs images of at least 3x3, got {height}x{width}")
    return side, 1.5 * side / 11


def psnr_db(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each sample against its reference: ``(N, ...)`` → ``(N,)``, values
    in ``[0, 1]`` (pixels, or min-max scaled features).

    Capped at :data:`MAX_PSNR_DB` (identical images would give ``inf``).
    """
    dims = tuple(range(1, images.dim()))
    values = peak_signal_noise_ratio(
        images.float(), references.float(), data_range=1.0, reduction="none", dim=dims
    )
    return values.reshape(-1).clamp(max=MAX_PSNR_DB)


def ssim(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """SSIM of each image against its reference: ``(N, C, H, W)`` → ``(N,)`` in [-1, 1];
    NaN ``(N,)`` where SSIM does not apply (:func:`ssim_applies`)."""
    if not ssim_applies(tuple(images.shape[1:])):
        return torch.full((images.shape[0],), float("nan"))
    kernel, sigma = ssim_window(images.shape[-2], images.shape[-1])
    values = structural_similarity_index_measure(
        images.float(), references.float(), data_range=1.0, kernel_size=kernel,
        sigma=sigma, reduction="none",
    )
    assert isinstance(values, torch.Tensor)  # torchmetrics returns a tuple only with full=True
    return values.reshape(-1)


def pairwise_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error between every image of ``a`` ``(N, ...)`` and of ``b`` ``(M, ...)``
    as an ``(N, M)`` matrix."""
    return torch.cdist(a.flatten(1).double(), b.flatten(1).double()) ** 2 / a[0].numel()


def match(victims: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """For each victim, the index of its reconstruction (least total MSE, one each).

    Raises:
        ValueError: if there are fewer reconstructions than victims.
    """
    if reconstructions.shape[0] < victims.shape[0]:
        raise ValueError(
            f"{reconstructions.shape[0]} reconstructions cannot cover {victims.shape[0]} victims"
        )
    rows, cols = linear_sum_assignment(pairwise_mse(victims, reconstructions).numpy())
    order = torch.empty(victims.shape[0], dtype=torch.long)
    order[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return order


@dataclass
class VictimScores:
    """Scores of one set of reconstructions against the victims, one entry per victim.

    Attributes:
        psnr_db, ssim: float ``(V,)``.
        identified: bool ``(V,)``.
        label_correct: bool ``(V,)``.
        images: float ``(V, C, H, W)``: the reconstruction paired with each victim.
    """

    psnr_db: torch.Tensor
    ssim: torch.Tensor
    identified: torch.Tensor
    label_correct: torch.Tensor
    images: torch.Tensor


def score(
    reconstructions: torch.Tensor,
    reconstructed_labels: torch.Tensor,
    victims: torch.Tensor,
    victim_labels: torch.Tensor,
    victim_indices: torch.Tensor,
    pool: torch.Tensor,
    mean_image: torch.Tensor,
    margin_db: float = IDENTIFICATION_MARGIN_DB,
) -> VictimScores:
    """Score ``reconstructions`` ``(N, ...)`` against ``victims`` ``(V, ...)`` (images
    ``(C, H, W)`` or ``[0, 1]``-scaled vectors).

    Args:
        reconstructions, reconstructed_labels: an attack's output (``N >= V``).
        victims, victim_labels: the real images and labels behind the update.
        victim_indices: ``(V,)`` position of each victim in ``pool``.
        pool: ``(M, C, H, W)`` the client's data, in which identification searches.
        mean_image: ``(C, H, W)`` the no-information guess (identification must beat it).
        margin_db: how much better than the mean image (PSNR, dB) an identified
            reconstruction must be.
    """
    reconstructions = reconstructions.float().cpu()
    order = match(victims, reconstructions)
    paired = reconstructions[order]
    nearest = pairwise_mse(paired, pool).argmin(dim=1)
    psnr = psnr_db(paired, victims)
    mean_psnr = psnr_db(mean_image.unsqueeze(0).expand_as(victims), victims)
    return VictimScores(
        psnr_db=psnr,
        ssim=ssim(paired, victims),
        identified=(nearest == victim_indices) & (psnr >= mean_psnr + margin_db),
        label_correct=reconstructed_labels.cpu()[order] == victim_labels.cpu(),
        images=paired,
    )

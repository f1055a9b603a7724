"""No-information baselines: what an attacker gets without looking at the update.

A reconstruction score only means something next to what a guess achieves. Two guesses
that use no information about the victim:

- the *mean image*: the per-pixel mean of the population (here the client's data,
  standing in for public data of the same distribution) — the best constant guess
  under MSE, hence the reference of the leak verdict;
- the *flat mean*: one grey level, the mean intensity, at every pixel.

Reported as PSNR / SSIM against the victims, so an attack reads as "dB above the
mean-image baseline".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flwr_guard.audit.scores import psnr_db, ssim


def mean_image(pool: torch.Tensor) -> torch.Tensor:
    """Per-pixel mean of ``pool`` ``(M, C, H, W)``: ``(C, H, W)``.

    Raises:
        ValueError: for an empty pool.
    """
    if pool.shape[0] == 0:
        raise ValueError("the pool of images is empty")
    return pool.float().mean(dim=0)


def flat_image(pool: torch.Tensor) -> torch.Tensor:
    """``(C, H, W)`` filled with the mean intensity of ``pool``."""
    return torch.full_like(mean_image(pool), float(pool.float().mean()))


@dataclass
class BaselineScores:
    """PSNR (dB) and SSIM of one no-information guess against each victim ``(V,)``."""

    name: str
    psnr_db: torch.Tensor
    ssim: torch.Tensor


def baseline_scores(victims: torch.Tensor, pool: torch.Tensor) -> dict[str, BaselineScores]:
    """Scores of the ``"mean-image"`` and ``"flat-mean"`` guesses against ``victims``."""
    guesses = {"mean-image": mean_image(pool), "flat-mean": flat_image(pool)}
    out = {}
    for name, guess in guesses.items():
        repeated = guess.unsqueeze(0).expand_as(victims)
        out[name] = BaselineScores(name, psnr_db(repeated, victims), ssim(repeated, victims))
    return out

"""Central and distributed (Skellam) noise match their calibration; clipping; rotation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flwr_guard.dp.central import add_gaussian_noise, central_noise_std
from flwr_guard.dp.clipping import (
    clip_update,
    global_l2_norm,
    split_noise_multiplier,
    update_clipping_norm,
)
from flwr_guard.dp.distributed import (
    DistributedNoise,
    add_skellam_noise,
    count_wraparounds,
    from_modular,
    skellam_mu,
    to_modular,
)
from flwr_guard.dp.rotation import inverse_randomized_hadamard, randomized_hadamard


def _unit_updates(rng: np.random.Generator, n: int, d: int) -> list[np.ndarray]:
    return [u / np.linalg.norm(u) for u in rng.normal(size=(n, d))]


def _std_within(sample: np.ndarray, expected: float, k: float = 5.0) -> None:
    # Sample std of m Gaussian-like values has relative std ~ 1/sqrt(2m): 5 sigma band.
    rel = k / math.sqrt(2 * sample.size)
    assert abs(sample.std() / expected - 1) < rel, (sample.std(), expected)


def test_central_noise_std_is_z_c_over_n() -> None:
    rng = np.random.default_rng(0)
    std = central_noise_std(1.1, 0.5, 20)
    assert std == pytest.approx(1.1 * 0.5 / 20)
    base = [np.zeros((200, 100), np.float32), np.ones(5000, np.float64)]
    noised = add_gaussian_noise(base, std, rng)
    assert [a.dtype for a in noised] == [np.float32, np.float64]
    residual = np.concatenate([(n - b).ravel() for n, b in zip(noised, base)])
    _std_within(residual, std)
    assert abs(residual.mean()) < 5 * std / math.sqrt(residual.size)
    with pytest.raises(ValueError):
        central_noise_std(1.0, 0.0, 3)


def test_skellam_noise_has_variance_two_mu_and_stays_integer() -> None:
    rng = np.random.default_rng(1)
    q = np.arange(100_000, dtype=np.int64)
    for mu in (0.5, 40.0, 1e6, 1e11):
        noised = add_skellam_noise(q, mu, rng)
        assert noised.dtype == np.int64
        _std_within((noised - q).astype(np.float64), math.sqrt(2 * mu))
    with pytest.raises(ValueError, match="integer"):
        add_skellam_noise(q.astype(np.float32), 1.0, rng)


def test_distributed_sum_carries_the_central_noise_and_decodes_the_mean() -> None:
    rng = np.random.default_rng(2)
    n, d, z, c = 50, 3000, 1.0, 0.5
    noise = DistributedNoise.calibrate(z, c, d, n, bits=32)
    # The calibration targets the Gaussian mechanism: effective z and sum std match.
    assert noise.effective_noise_multiplier == pytest.approx(z, rel=1e-9)
    assert noise.sum_noise_std == pytest.approx(z * c, rel=2e-3)  # rounding: <= 0.1 %
    updates = [c * u for u in _unit_updates(rng, n, d)]
    total = np.zeros(noise.encode(updates[0], 7, rng).shape, dtype=np.uint64)
    true_sum = np.zeros_like(total, dtype=np.int64)
    for u in updates:
        encoded = noise.encode(u, seed=7, rng=rng)
        assert encoded.dtype == np.uint64 and int(encoded.max()) < 2**32
        total = (total + encoded) % np.uint64(2**32)
        true_sum += from_modular(encoded, 32)
    mean = noise.decode(total, seed=7, num_contributors=n)
    error = mean - np.mean(updates, axis=0)
    _std_within(error, central_noise_std(z, c, n))  # the same std as central DP
    assert count_wraparounds(true_sum, 32) == 0


def test_wraparounds_are_counted_when_the_modulus_is_too_small() -> None:
    values = np.array([0, 100, -100, 130, -129, 127, -128])
    assert count_wraparounds(values, 8) == 2  # 130 and -129 leave [-128, 128)
    np.testing.assert_array_equal(from_modular(to_modular(values, 8), 8)[[0, 1, 2, 5, 6]],
                                  values[[0, 1, 2, 5, 6]])
    with pytest.raises(ValueError, match="more bits"):
        DistributedNoise.calibrate(1.0, 1.0, 10**6, 10, bits=8)


def test_mu_scales_with_clients_and_quantised_sensitivity() -> None:
    mu10 = skellam_mu(1.0, 1.0, 1e-3, 1000, 10)
    assert mu10 == pytest.approx((1000 + math.sqrt(1000)) ** 2 / 20)
    assert skellam_mu(1.0, 1.0, 1e-3, 1000, 20) == pytest.approx(mu10 / 2)


def test_rotation_is_orthogonal_invertible_and_flattens_a_spike() -> None:
    x = np.zeros(1000)
    x[3] = 10.0
    y = randomized_hadamard(x, seed=11)
    assert y.shape == (1024,)
    assert np.linalg.norm(y) == pytest.approx(10.0)
    assert np.abs(y).max() == pytest.approx(10.0 / math.sqrt(1024))  # energy spread evenly
    np.testing.assert_allclose(inverse_randomized_hadamard(y, 11, 1000), x, atol=1e-12)
    assert not np.allclose(randomized_hadamard(x, seed=12), y)


def test_clip_update_scales_to_the_norm_and_reports_the_bit() -> None:
    update = [np.full(4, 3.0, np.float32), np.full(9, 1.0, np.float32)]  # norm sqrt(45)
    clipped, norm, unclipped = clip_update(update, 1.5)
    assert norm == pytest.approx(math.sqrt(45)) and not unclipped
    assert global_l2_norm(clipped) == pytest.approx(1.5, rel=1e-6)
    assert clipped[0].dtype == np.float32
    np.testing.assert_allclose(clipped[0] / clipped[1][0], 3.0, rtol=1e-6)  # direction kept
    same, _, unclipped = clip_update(update, 10.0)
    assert unclipped and all(np.array_equal(a, b) for a, b in zip(same, update))
    with pytest.raises(ValueError, match="non-finite"):
        clip_update([np.array([np.nan])], 1.0)


def test_adaptive_clipping_follows_the_quantile_and_splits_the_noise() -> None:
    # Andrew et al. Theorem 1: z = (z_delta^-2 + (2 sigma_b)^-2)^-1/2.
    z_delta = split_noise_multiplier(1.0, 5.0)
    assert (z_delta ** -2 + 10.0 ** -2) ** -0.5 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="must exceed"):
        split_noise_multiplier(1.0, 0.4)
    rng = np.random.default_rng(3)
    norms = rng.lognormal(0.0, 0.5, size=10_000)
    c = 0.05
    for _ in range(200):
        cohort = rng.choice(norms, 100)
        centred = float((cohort <= c).sum()) - len(cohort) / 2  # bits b - 1/2
        c, _ = update_clipping_norm(c, centred, 100, 0.5, 0.2, 100 / 20, rng)
    assert c == pytest.approx(np.median(norms), rel=0.15)  # converged to the median
    # Centred bits: with every client unclipped the noiseless estimate is exactly 1,
    # with none 0, whatever the denominator's relation to the realised count.
    assert update_clipping_norm(1.0, 50.0, 100, 0.5, 0.2, 0.0, rng)[1] == pytest.approx(1.0)
    assert update_clipping_norm(1.0, -50.0, 100, 0.5, 0.2, 0.0, rng)[1] == pytest.approx(0.0)

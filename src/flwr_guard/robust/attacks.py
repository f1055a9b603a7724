"""Evasion attacks under an L-infinity budget, first and zeroth order (no Flower imports).

Every attack takes a classifier ``model`` (a callable ``(B, C, H, W) float32 -> (B, K)
logits``), images ``x`` in ``[0, 1]`` and their labels ``y`` (int64 ``(B,)``), and returns
adversarial images ``x_adv`` with ``||x_adv - x||_inf <= eps`` and ``x_adv`` in ``[0, 1]``,
same shape, dtype and device as ``x``. Examples are attacked independently (a batch is
only a speed-up). Pixels are in ``[0, 1]``, so ``eps`` is in pixel units.

- :func:`fgsm`: Goodfellow et al., "Explaining and Harnessing Adversarial Examples",
  ICLR 2015 (one signed-gradient step of the cross-entropy).
- :func:`pgd`: Madry et al., "Towards Deep Learning Models Resistant to Adversarial
  Attacks", ICLR 2018, Sec. 2-3 (random start in the ball, signed steps, projection),
  with restarts; each example keeps its worst case over restarts (lowest margin).
- :func:`spsa`: Uesato et al., "Adversarial Risk and the Dangers of Evaluating Against
  Weak Attacks", ICML 2018, Sec. 3.1 (SPSA gradient estimate from Rademacher probes of the
  margin loss, Adam on the estimate, projection). Zeroth order: only logits are queried.
- :func:`square`: Andriushchenko et al., "Square Attack", ECCV 2020, Sec. 3.1 / Alg. 1-2
  (random search over square windows set to a vertex of the ball, accepted when the
  margin falls; window side from the paper's ``p`` schedule). Zeroth order.

The loss every attack lowers (or whose cross-entropy proxy it raises) is the classifier's
margin ``z_y - max_{j != y} z_j``: the example is misclassified once it is negative.
On a linear two-class model ``z = W x + b`` the optimal L-infinity perturbation of the
margin is ``-eps * sign(w_y - w_other)``; ``tests/test_robust_attacks.py`` checks every
attack against it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Model = Callable[[torch.Tensor], torch.Tensor]

FIRST_ORDER = ("fgsm", "pgd")
ZEROTH_ORDER = ("spsa", "square")


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{j != y} z_j`` per example: ``(B, K), (B,) -> (B,)``; < 0 = misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], -math.inf)
    return true - other.max(dim=1).values


def _check(x: torch.Tensor, y: torch.Tensor, eps: float) -> None:
    if x.ndim < 2 or y.shape != (x.shape[0],):
        raise ValueError(f"need x (B, ...) and y (B,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x holds NaN or Inf")
    if not eps >= 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def _input_grad(model: Model, x: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    logits = model(x)
    value = F.cross_entropy(logits, y, reduction="sum") if loss == "ce" else -margin(logits, y).sum()
    (grad,) = torch.autograd.grad(value, [x])
    return grad


def fgsm(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method: ``clip(x + eps * sign(grad_x CE(model(x), y)))``.

    Raises:
        ValueError: on mismatched shapes, NaN/Inf pixels or ``eps < 0``.
    """
    _check(x, y, eps)
    return _project(x + eps * _input_grad(model, x, y, "ce").sign(), x, eps).detach()


def pgd(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 40,
    restarts: int = 1,
    step_size: float | None = None,
    loss: str = "ce",
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018) with ``restarts`` random starts.

    Args:
        steps: signed-gradient steps per restart (>= 1).
        restarts: random starts (>= 1); per example the restart with the lowest margin
            wins.
        step_size: ``alpha``; default ``2.5 * eps / steps`` (Madry et al., Sec. 5).
        loss: ``"ce"`` (cross-entropy, raised) or ``"margin"`` (CW margin, lowered).
        random_start: start uniformly in the ball (the first restart too).
        generator: CPU generator for the random starts (reproducible runs).

    Raises:
        ValueError: as :func:`fgsm`, and for ``steps < 1``, ``restarts < 1`` or an
            unknown ``loss``.
    """
    _check(x, y, eps)
    if steps < 1 or restarts < 1 or loss not in ("ce", "margin"):
        raise ValueError(f"need steps >= 1, restarts >= 1, loss in ce/margin; got {steps}, {restarts}, {loss!r}")
    alpha = 2.5 * eps / steps if step_size is None else step_size
    x = x.detach()
    best, best_margin = x.clone(), torch.full((x.shape[0],), math.inf, device=x.device)
    for _ in range(restarts):
        x_adv = x.clone()
        if random_start and eps > 0:
            noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x_adv = _project(x + (2 * noise - 1) * eps, x, eps)
        for _ in range(steps):
            x_adv = _project(x_adv + alpha * _input_grad(model, x_adv, y, loss).sign(), x, eps)
        with torch.no_grad():
            m = margin(model(x_adv), y)
        better = m < best_margin
        best[better], best_margin[better] = x_adv[better], m[better]
    return best.detach()


@torch.no_grad()
def spsa(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 50,
    samples: int = 64,
    delta: float = 0.01,
    learning_rate: float = 0.01,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SPSA (Uesato et al. 2018): Adam on a finite-difference gradient estimate.

    Each step draws ``samples`` Rademacher directions ``v`` per example and estimates
    ``grad margin ~ mean_v (margin(x + delta v) - margin(x - delta v)) / (2 delta) * v``
    (``2 * samples`` queries per step); the estimate drives Adam (lr ``learning_rate``)
    downhill, then the iterate is projected. Per example the lowest-margin iterate is
    returned. Never calls ``backward``.

    Raises:
        ValueError: as :func:`fgsm`, and for ``steps``, ``samples`` < 1 or ``delta <= 0``.
    """
    _check(x, y, eps)
    if steps < 1 or samples < 1 or not delta > 0:
        raise ValueError(f"need steps >= 1, samples >= 1, delta > 0; got {steps}, {samples}, {delta}")
    x = x.detach()
    b = x.shape[0]
    x_adv = x.clone()
    best, best_margin = x.clone(), margin(model(x), y)
    m1, m2 = torch.zeros_like(x), torch.zeros_like(x)
    beta1, beta2 = 0.9, 0.999
    for t in range(1, steps + 1):
        v = (torch.randint(0, 2, (samples, *x.shape), generator=generator).to(x.device) * 2 - 1).to(x.dtype)
        probes = torch.cat([x_adv + delta * v, x_adv - delta * v]).reshape(-1, *x.shape[1:])
        ys = y.repeat(2 * samples)
        values = margin(model(probes), ys).reshape(2, samples, b)
        diff = (values[0] - values[1]) / (2 * delta)  # (samples, B)
        grad = (diff.reshape(samples, b, *([1] * (x.ndim - 1))) * v).mean(dim=0)
        m1 = beta1 * m1 + (1 - beta1) * grad
        m2 = beta2 * m2 + (1 - beta2) * grad * grad
        step = (m1 / (1 - beta1**t)) / ((m2 / (1 - beta2**t)).sqrt() + 1e-8)
        x_adv = _project(x_adv - learning_rate * step, x, eps)
        m = margin(model(x_adv), y)
        better = m < best_margin
        best[better], best_margin[better] = x_adv[better], m[better]
    return best


def _square_fraction(p_init: float, it: int, total: int) -> float:
    """The paper's piecewise-constant schedule of ``p`` (fraction of pixels changed),
    rescaled to ``total`` queries as in the reference implementation (10k queries)."""
    i = int(it / total * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32),
                       (4000, 64), (6000, 128), (8000, 256)):
        if i <= bound:
            return p_init / div
    return p_init / 512


@torch.no_grad()
def square(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    queries: int = 500,
    p_init: float = 0.3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Square attack, L-infinity (Andriushchenko et al. 2020, Alg. 1 with Alg. 2's proposal).

    Starts from vertical stripes of ``+-eps``; each query redraws one random square
    window (side ``round(sqrt(p * H * W))``, at least 1) per example to ``x + eps * s``
    with one random sign ``s`` per channel, and keeps it when the margin falls. Examples
    already misclassified stop changing. One model query per iteration.

    Raises:
        ValueError: as :func:`fgsm`, for images that are not ``(B, C, H, W)`` and for
            ``queries < 1``.
    """
    _check(x, y, eps)
    if x.ndim != 4 or queries < 1:
        raise ValueError(f"square needs (B, C, H, W) images and queries >= 1, got {tuple(x.shape)}, {queries}")
    x = x.detach()
    b, c, h, w = x.shape

    def rand_signs(*shape: int) -> torch.Tensor:
        return (torch.randint(0, 2, shape, generator=generator).to(x.device) * 2 - 1).to(x.dtype)

    x_best = _project(x + eps * rand_signs(b, c, 1, w), x, eps)
    m_best = margin(model(x_best), y)
    for it in range(queries):
        active = m_best > 0
        if not active.any():
            break
        p = _square_fraction(p_init, it, queries)
        side = max(1, min(h, w, round(math.sqrt(p * h * w))))
        rows = torch.randint(0, h - side + 1, (b,), generator=generator)
        cols = torch.randint(0, w - side + 1, (b,), generator=generator)
        signs = rand_signs(b, c)
        candidate = x_best.clone()
        for i in torch.nonzero(active).flatten().tolist():
            r, s = int(rows[i]), int(cols[i])
            candidate[i, :, r:r + side, s:s + side] = (
                x[i, :, r:r + side, s:s + side] + eps * signs[i][:, None, None]
            )
        candidate = _project(candidate, x, eps)
        m = margin(model(candidate), y)
        better = active & (m < m_best)
        x_best[better], m_best[better] = candidate[better], m[better]
    return x_best


ATTACKS: dict[str, Callable[..., torch.Tensor]] = {"fgsm": fgsm, "pgd": pgd, "spsa": spsa, "square": square}

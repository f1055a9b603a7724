"""Grad-CAM++ against its closed form; PGCA finds a planted single-cell cue; IG is complete."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flwr_guard.device import cpu_settings
from flwr_guard.robust.attributions import (
    METHODS,
    gradcam_pp,
    integrated_gradients,
    pgca_cells,
)


class ConvSumHead(nn.Module):
    """``S_c = sum_k v_ck sum_ij A_kij`` with ``A = conv(x)``: ``dS_c/dA_kij = v_ck``."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.head = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.rand(3, 1, 3, 3, generator=g))
            self.conv.bias.zero_()
            self.head.weight.copy_(torch.tensor([[0.5, -1.0, 2.0], [1.0, 1.0, -0.3]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).sum(dim=(2, 3)))


def test_gradcam_pp_matches_its_closed_form_on_a_small_model() -> None:
    model = ConvSumHead()
    x = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1])
    cam = gradcam_pp(model, x, target, layer=model.conv, upsample=False)
    a = model.conv(x).detach()
    for i, c in enumerate(target.tolist()):
        v = model.head.weight[c].detach()  # g_kij = v_k everywhere
        # alpha_k = v^2 / (2 v^2 + v^3 sum A_k); w_k = h * w * alpha_k * relu(v_k)
        alpha = v**2 / (2 * v**2 + v**3 * a[i].sum(dim=(1, 2)))
        w = 36 * alpha * F.relu(v)
        expected = F.relu((w[:, None, None] * a[i]).sum(0))
        torch.testing.assert_close(cam[i, 0], expected, rtol=1e-5, atol=1e-6)
    assert cam[1].sum() > 0 and cam[0].sum() > 0


def cue_task(n: int, seed: int):
    """16x16 images, faint noise; class 1 has one bright 2x2 cell (of an 8x8 grid) at a
    random position, class 0 none. Returns images, labels and the cue's cell ids."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.rand(n, 1, 16, 16, generator=g)
    y = torch.arange(n) % 2
    cells = torch.randint(0, 64, (n,), generator=g)
    for i in range(n):
        if y[i] == 1:
            r, c = divmod(int(cells[i]), 8)
            x[i, 0, 2 * r:2 * r + 2, 2 * c:2 * c + 2] = 1.0
    return x, y, cells


def test_pgca_ranks_a_planted_single_cell_cue_first() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    x, y, _ = cue_task(512, 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with cpu_settings("cpu", 1):
        for _ in range(150):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    xt, yt, cells = cue_task(64, 1)
    assert (model(xt).argmax(1) == yt).float().mean() > 0.95
    pos = yt == 1
    maps = pgca_cells(model, xt[pos], yt[pos], grid=8, generator=torch.Generator().manual_seed(0))
    top = maps["consensus"].argmax(dim=1)
    assert (top == cells[pos]).float().mean() == 1.0, (top, cells[pos])


def test_integrated_gradients_is_complete_and_every_method_keeps_the_input_shape() -> None:
    model = ConvSumHead()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 1, 0])
    _, gap = integrated_gradients(model, x, target)
    assert gap.abs().max() < 1e-3  # linear in x: IG is exact
    for name, method in METHODS.items():
        out = method(model, x, target)
        assert out.shape == x.shape and torch.isfinite(out).all(), name

"""Text: the token set of a batch from the embedding layer's gradient, and its F1.

An ``nn.Embedding`` looks up one row per token id, so the gradient of its weight is
non-zero exactly in the rows of the tokens that occur in the batch: the server reads
the batch's set of words off the update (Melis et al., "Exploiting Unintended Feature
Leakage in Collaborative Learning", IEEE S&P 2019, Sec. V-A, "Leakage from embedding
layer gradients"; used as the first step of FILM, Gupta et al., "Recovering Private
Text in Federated Learning of Language Models", NeurIPS 2022, Sec. 3.1). The set
survives clipping (a rescaling) and aggregation (a union over the cohort); noise hides
it only when it drowns the rows: a row counts as present when its L2 norm exceeds
``noise_std · (√E + 4)`` — four standard deviations above the norm of a pure-noise row
of ``E`` Gaussian entries — or, without noise, ``1e-9`` of the largest row.

Score: per victim sample, the F1 of the recovered set against that sample's own
token set (torchmetrics ``binary_f1_score`` over the vocabulary's indicator vector).
Baseline: guessing, for each victim, as many of the client's most
frequent tokens as the victim has distinct tokens.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchmetrics.functional.classification import binary_f1_score


def embedding_names(model: nn.Module) -> list[str]:
    """Weight names of every ``nn.Embedding`` of ``model`` (in module order)."""
    return [f"{n}.weight" if n else "weight" for n, m in model.named_modules()
            if isinstance(m, nn.Embedding)]


def recovered_tokens(row_gradient: torch.Tensor, noise_std: float = 0.0) -> torch.Tensor:
    """Token ids whose embedding-gradient row is non-zero (see the module doc).

    Args:
        row_gradient: ``(V, E)`` observed update of the embedding weight.
        noise_std: standard deviation of the Gaussian noise per entry, in the same
            units (0 for none).

    Returns:
        int64 ``(K,)`` sorted token ids.
    """
    norms = row_gradient.detach().double().norm(dim=1)
    if noise_std > 0:
        threshold = noise_std * (math.sqrt(row_gradient.shape[1]) + 4.0)
    else:
        threshold = 1e-9 * float(norms.max().clamp_min(1e-300))
    return torch.nonzero(norms > threshold).flatten().cpu()


def token_sets(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``(N, V)`` int indicator of the distinct tokens of each sample ``(N, L)``."""
    out = torch.zeros((tokens.shape[0], vocab_size), dtype=torch.long)
    out.scatter_(1, tokens.long().cpu().clamp(0, vocab_size - 1), 1)
    return out


def token_f1(recovered: torch.Tensor, victims: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """F1 of one recovered set ``(K,)`` against each victim's tokens ``(N, L)`` → ``(N,)``."""
    target = token_sets(victims, vocab_size)
    guess = torch.zeros(vocab_size, dtype=torch.long)
    guess[recovered.long()] = 1
    return torch.stack([binary_f1_score(guess, row, zero_division=0) for row in target]).float()


def frequent_tokens_f1(victims: torch.Tensor, pool: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The no-information baseline: each victim ``(N, L)`` guessed as the client's
    ``|T_v|`` most frequent tokens over ``pool`` ``(M, L)`` → ``(N,)``."""
    counts = torch.bincount(pool.long().flatten().cpu(), minlength=vocab_size)[:vocab_size]
    ranked = torch.argsort(counts, descending=True, stable=True)
    target = token_sets(victims, vocab_size)
    out = []
    for row in target:
        guess = ranked[: int(row.sum())]
        out.append(token_f1(guess, row.nonzero().flatten().unsqueeze(0), vocab_size)[0])
    return torch.stack(out)

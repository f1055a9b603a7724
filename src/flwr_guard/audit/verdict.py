"""The leak verdict: when does an audit say an update leaks?

An update **leaks** when, under the worst case over the attacks run,

1. at least one victim is *identified* (its reconstruction's nearest sample in the
   client's data is the victim, and the reconstruction's PSNR beats the mean image's
   by at least 1 dB — see :mod:`flwr_guard.audit.scores`), or
2. the mean PSNR over the victims is more than ``psnr_margin_db`` (default 3 dB)
   above the mean-image baseline's.

Rule 1 catches a reconstruction good enough to single a person's record out; rule 2
catches partial reconstructions (a blurred digit whose class and shape show) that are
not yet nearest to the victim. Label recovery alone is not a leak under this rule: the
label of a single sample follows from the last layer's gradient in any unprotected
update (iDLG), and is reported separately.

For vectors (tabular rows, embeddings) the same two rules apply to the features scaled
to ``[0, 1]`` by the client's per-feature range. For text (token ids) an update leaks
when the token-recovery F1 beats the baseline that guesses the client's most frequent
tokens by more than ``token_f1_margin`` (default 0.2).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VerdictRule:
    """Thresholds of the leak verdict.

    Attributes:
        psnr_margin_db: PSNR gain over the mean-image baseline above which the update
            leaks (dB, >= 0).
        max_identified_rate: share of victims that may be identified without a leak
            verdict (0 = none may).

    Raises:
        ValueError: for a negative margin or a rate outside ``[0, 1)``.
    """

    psnr_margin_db: float = 3.0
    max_identified_rate: float = 0.0
    token_f1_margin: float = 0.2

    def __post_init__(self) -> None:
        if self.psnr_margin_db < 0:
            raise ValueError(f"psnr_margin_db must be >= 0, got {self.psnr_margin_db}")
        if not 0.0 <= self.max_identified_rate < 1.0:
            raise ValueError(
                f"max_identified_rate must be in [0, 1), got {self.max_identified_rate}"
            )

    def judge_tokens(self, f1: float, f1_gain: float) -> tuple[bool, str]:
        """``(leaks, reason)`` for text: the worst-case token F1 and its gain over the
        baseline that guesses the client's most frequent tokens."""
        if f1_gain > self.token_f1_margin:
            return True, (f"token F1 {f1:.2f}, {f1_gain:+.2f} above the frequent-tokens "
                          f"baseline (margin {self.token_f1_margin:g})")
        return False, (f"token F1 {f1:.2f}, {f1_gain:+.2f} vs the frequent-tokens baseline "
                       f"(margin {self.token_f1_margin:g})")

    def judge(self, identified_rate: float, psnr_gain_db: float) -> tuple[bool, str]:
        """Return ``(leaks, reason)`` for the worst-case scores of an audit."""
        if identified_rate > self.max_identified_rate:
            return True, f"{identified_rate:.0%} of victims identified"
        if psnr_gain_db > self.psnr_margin_db:
            return True, (
                f"PSNR {psnr_gain_db:.1f} dB above the mean-image baseline "
                f"(margin {self.psnr_margin_db:g} dB)"
            )
        return False, (
            f"no victim identified; PSNR {psnr_gain_db:+.1f} dB vs the mean-image "
            f"baseline (margin {self.psnr_margin_db:g} dB)"
        )

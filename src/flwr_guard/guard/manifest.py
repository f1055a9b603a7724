"""The protection manifest: what the server's strategy runs, sent with every train message.

Core (no Flower imports). :class:`~flwr_guard.guard.strategy.GuardedStrategy` builds one
manifest from the wrappers it actually constructed and puts it, as a JSON string, under
:data:`MANIFEST_KEY` in the train config of every round; the client's
:func:`~flwr_guard.guard.client_mod.policy_mod` parses it (:meth:`ProtectionManifest.parse`)
and checks it against the client's own :class:`~flwr_guard.guard.policy.ClientPolicy`.

The manifest is a *declaration*, not a proof: a malicious server can send any manifest.
What protects a client against such a server is that the client checks the protocol
messages themselves (a plain train message when SecAgg+ is required is refused whatever
the manifest says; the SecAgg+ client enforces its own floors on (n, k, t); the update
clipping mod clips to the norm in the config, which the policy bounds). The manifest
turns a *forgetful* server (a wrapper left out, a weaker parameter) into a clear error on
both sides instead of a silent downgrade.

Wire format (version 1), at most :data:`MAX_MANIFEST_BYTES` of UTF-8 JSON::

    {"version": 1,
     "protections": ["secagg", "central-dp", "reply-guard", ...],
     "secagg": {"num_shares": 4 | null, "reconstruction_threshold": 3 | null,
                "clipping_range": 2.0, "quantization_range": 65536} | null,
     "dp": {"mode": "central" | "distributed", "noise_multiplier": 1.0,
            "clipping_norm": 0.5, "adaptive": false} | null}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from flwr_guard.errors import FlwrGuardError

MANIFEST_VERSION = 1
MANIFEST_KEY = "flwr-guard-manifest"
MAX_MANIFEST_BYTES = 4096

#: Every protection name a manifest may list.
PROTECTIONS = (
    "secagg",  # SecAgg+: the server sees only the sum of masked updates
    "central-dp",  # DPFedAvg adds Gaussian noise to the aggregate (user level)
    "distributed-dp",  # clients add Skellam noise under SecAgg+ (user level)
    "update-clipping",  # clients clip their update to the clipping norm
    "reply-guard",  # the server drops replies that carry more than the update
    "audit-summary",  # the server collects the clients' leakage-audit scores
    "telemetry",  # Prometheus metrics of every round
)

DPMode = Literal["central", "distributed"]


class ManifestError(FlwrGuardError, ValueError):
    """A manifest that is malformed, oversized or of an unknown version."""


def _finite_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ManifestError(f"manifest field {name!r} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ManifestError(f"manifest field {name!r} must be finite and > 0, got {value}")
    return value


def _optional_int(name: str, value: Any, low: int, high: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ManifestError(f"manifest field {name!r} must be an integer in [{low}, {high}]")
    return value


@dataclass(frozen=True)
class SecAggTerms:
    """SecAgg+ parameters the server announces (``None`` = chosen per round from n)."""

    num_shares: int | None
    reconstruction_threshold: int | None
    clipping_range: float
    quantization_range: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_shares": self.num_shares,
            "reconstruction_threshold": self.reconstruction_threshold,
            "clipping_range": self.clipping_range,
            "quantization_range": self.quantization_range,
        }

    @classmethod
    def from_dict(cls, data: Any) -> SecAggTerms:
        if not isinstance(data, dict):
            raise ManifestError("manifest field 'secagg' must be an object or null")
        q = data.get("quantization_range")
        if isinstance(q, bool) or not isinstance(q, int) or not 2 <= q <= 2**32:
            raise ManifestError("manifest field 'secagg.quantization_range' must be an integer in [2, 2^32]")
        return cls(
            num_shares=_optional_int("secagg.num_shares", data.get("num_shares"), 1, 10**6),
            reconstruction_threshold=_optional_int(
                "secagg.reconstruction_threshold", data.get("reconstruction_threshold"), 1, 10**6
            ),
            clipping_range=_finite_positive("secagg.clipping_range", data.get("clipping_range")),
            quantization_range=q,
        )


@dataclass(frozen=True)
class DPTerms:
    """User-level DP the server announces: where the noise is added, z and C."""

    mode: DPMode
    noise_multiplier: float
    clipping_norm: float
    adaptive: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "noise_multiplier": self.noise_multiplier,
            "clipping_norm": self.clipping_norm,
            "adaptive": self.adaptive,
        }

    @classmethod
    def from_dict(cls, data: Any) -> DPTerms:
        if not isinstance(data, dict):
            raise ManifestError("manifest field 'dp' must be an object or null")
        mode = data.get("mode")
        if mode not in ("central", "distributed"):
            raise ManifestError(f"manifest field 'dp.mode' must be 'central' or 'distributed', got {mode!r}")
        adaptive = data.get("adaptive", False)
        if not isinstance(adaptive, bool):
            raise ManifestError("manifest field 'dp.adaptive' must be a boolean")
        return cls(
            mode=mode,
            noise_multiplier=_finite_positive("dp.noise_multiplier", data.get("noise_multiplier")),
            clipping_norm=_finite_positive("dp.clipping_norm", data.get("clipping_norm")),
            adaptive=adaptive,
        )


@dataclass(frozen=True)
class ProtectionManifest:
    """What the server's strategy chain runs (see the module docstring).

    Attributes:
        protections: names from :data:`PROTECTIONS`, sorted, no duplicates.
        secagg: the SecAgg+ parameters when ``"secagg"`` is listed, else ``None``.
        dp: the user-level DP parameters when ``"central-dp"`` or ``"distributed-dp"`` is
            listed, else ``None``.
        version: wire-format version (:data:`MANIFEST_VERSION`).

    Raises:
        ManifestError: for unknown protection names or terms that do not match the list.
    """

    protections: tuple[str, ...]
    secagg: SecAggTerms | None = None
    dp: DPTerms | None = None
    version: int = field(default=MANIFEST_VERSION)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.protections) - set(PROTECTIONS))
        if unknown:
            raise ManifestError(f"unknown protections in manifest: {unknown}")
        object.__setattr__(self, "protections", tuple(sorted(set(self.protections))))
        if ("secagg" in self.protections) != (self.secagg is not None):
            raise ManifestError("manifest lists 'secagg' without its parameters, or the reverse")
        dp_listed = [p for p in self.protections if p in ("central-dp", "distributed-dp")]
        if len(dp_listed) > 1:
            raise ManifestError("manifest lists both central and distributed DP")
        if bool(dp_listed) != (self.dp is not None):
            raise ManifestError("manifest lists DP without its parameters, or the reverse")
        if self.dp is not None and dp_listed[0] != f"{self.dp.mode}-dp":
            raise ManifestError(f"manifest lists {dp_listed[0]!r} but its DP mode is {self.dp.mode!r}")
        if self.dp is not None and self.dp.mode == "distributed" and self.secagg is None:
            raise ManifestError("distributed DP needs SecAgg+ (the noise is added under the masks)")

    def has(self, protection: str) -> bool:
        return protection in self.protections

    def to_json(self) -> str:
        """The manifest as compact JSON (what travels in the train config)."""
        return json.dumps(
            {
                "version": self.version,
                "protections": list(self.protections),
                "secagg": self.secagg.to_dict() if self.secagg else None,
                "dp": self.dp.to_dict() if self.dp else None,
            },
            separators=(",", ":"),
            sort_keys=True,
        )

    @classmethod
    def parse(cls, text: Any) -> ProtectionManifest:
        """Parse and validate a manifest received from the server.

        Args:
            text: the value under :data:`MANIFEST_KEY` (``str``, at most
                :data:`MAX_MANIFEST_BYTES` bytes of UTF-8).

        Raises:
            ManifestError: for a non-string, an oversized or malformed document, an
                unknown version, or fields of the wrong type or range. Nothing larger
                than the limit is decoded.
        """
        if not isinstance(text, str):
            raise ManifestError(f"the manifest must be a string, got {type(text).__name__}")
        if len(text) > MAX_MANIFEST_BYTES or len(text.encode("utf-8")) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"the manifest is larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:
            raise ManifestError(f"the manifest is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ManifestError("the manifest must be a JSON object")
        version = data.get("version")
        if type(version) is not int or version != MANIFEST_VERSION:
            raise ManifestError(
                f"manifest version {version!r} is not supported (this client speaks "
                f"{MANIFEST_VERSION}): use the same flwr-guard version on server and clients"
            )
        protections = data.get("protections")
        if not isinstance(protections, list) or not all(isinstance(p, str) for p in protections):
            raise ManifestError("manifest field 'protections' must be a list of strings")
        secagg = data.get("secagg")
        dp = data.get("dp")
        return cls(
            protections=tuple(protections),
            secagg=SecAggTerms.from_dict(secagg) if secagg is not None else None,
            dp=DPTerms.from_dict(dp) if dp is not None else None,
        )

    def describe(self) -> list[str]:
        """One human-readable line per protection (for Flower's log)."""
        lines = []
        if self.secagg is not None:
            s = self.secagg
            k = s.num_shares if s.num_shares is not None else "auto"
            t = s.reconstruction_threshold if s.reconstruction_threshold is not None else "auto"
            lines.append(
                f"SecAgg+: num_shares={k}, reconstruction_threshold={t}, "
                f"clipping_range={s.clipping_range:g}, quantization_range={s.quantization_range}"
            )
        if self.dp is not None:
            d = self.dp
            lines.append(
                f"{d.mode} DP: noise_multiplier={d.noise_multiplier:g}, "
                f"clipping_norm={d.clipping_norm:g}{' (adaptive)' if d.adaptive else ''}"
            )
        for name in self.protections:
            if name not in ("secagg", "central-dp", "distributed-dp"):
                lines.append(name)
        return lines

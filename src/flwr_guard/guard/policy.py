"""The client's own protection policy, checked against what the server announces.

Core (no Flower imports). A :class:`ClientPolicy` says what a client requires before any
update leaves it. :meth:`ClientPolicy.check` compares it with the server's
:class:`~flwr_guard.guard.manifest.ProtectionManifest` *and* with the effective values
in the train config (the clipping norm and noise multiplier the DP wrappers actually
send), and returns one message per mismatch, each naming the fix on the server side.
The server is the adversary: a server that asks for less than the policy is refused,
whatever its manifest says.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from flwr_guard.config_values import choice
from flwr_guard.dp.node_policy import DEFAULT_MIN_NOISE_MULTIPLIER
from flwr_guard.dp.node_policy import min_noise_multiplier as node_min_noise_multiplier
from flwr_guard.guard.manifest import ProtectionManifest
from flwr_guard.keys import NodeConfig, TrainConfig

CONFIG_ADAPTIVE = TrainConfig.DP_ADAPTIVE_CLIPPING
CONFIG_CLIPPING_NORM = TrainConfig.DP_CLIPPING_NORM
CONFIG_NOISE_MULTIPLIER = TrainConfig.DP_NOISE_MULTIPLIER

RequiredDP = Literal["central", "distributed", "any"]

#: Node-config keys (``flower-supernode --node-config``) of the node operator's policy.
#: The app's code, ClientGuard included, travels in the FAB that the run's submitter
#: sends; the node config is the operator's own: the policy in force is the stricter of
#: the two (:meth:`ClientPolicy.with_node_config`).
NODE_REQUIRE_SECAGG = NodeConfig.GUARD_REQUIRE_SECAGG
NODE_REQUIRE_DP = NodeConfig.GUARD_REQUIRE_DP
#: The user-level noise floor has one key, shared with distributed DP's client side
#: (``dp-min-noise-multiplier``, default 0.5); ``guard-min-noise-multiplier`` is its
#: deprecated alias (the larger of the two wins).
NODE_MIN_NOISE_MULTIPLIER = NodeConfig.DP_MIN_NOISE_MULTIPLIER
NODE_MIN_NOISE_MULTIPLIER_DEPRECATED = NodeConfig.GUARD_MIN_NOISE_MULTIPLIER
NODE_MAX_CLIPPING_NORM = NodeConfig.GUARD_MAX_CLIPPING_NORM
NODE_REQUIRE_DPSGD = NodeConfig.GUARD_REQUIRE_DP_SGD


@dataclass(frozen=True)
class ClientPolicy:
    """What this client requires of the server (see the module docstring).

    Attributes:
        secagg: require SecAgg+: a train message that carries the model in the clear is
            refused and nothing is sent.
        dp: require user-level DP by the server: ``"central"`` (DPFedAvg's Gaussian
            noise; trusts the server to add it), ``"distributed"`` (clients add the noise
            under SecAgg+; does not trust it), ``"any"``, or ``None``.
        min_noise_multiplier: with ``dp``, the smallest noise multiplier z accepted
            (``None``: the library default
            :data:`~flwr_guard.dp.node_policy.DEFAULT_MIN_NOISE_MULTIPLIER`, 0.5).
        max_clipping_norm: with ``dp``, the largest clipping norm C accepted (the update
            clipping mod clips to the C in the config, so a larger C weakens the bound).
        dpsgd: require that the train function trained with DP-SGD
            (:meth:`~flwr_guard.guard.client.ClientGuard.private_training`) for every update
            it sends.

    Raises:
        ValueError: for a floor that is not finite and > 0, or a DP floor without ``dp``.
    """

    secagg: bool = False
    dp: RequiredDP | None = None
    min_noise_multiplier: float | None = None
    max_clipping_norm: float | None = None
    dpsgd: bool = False

    def __post_init__(self) -> None:
        if self.dp not in (None, "central", "distributed", "any"):
            raise ValueError(f"dp must be 'central', 'distributed', 'any' or None, got {self.dp!r}")
        if self.dp == "distributed" and not self.secagg:
            raise ValueError("distributed DP adds the noise under SecAgg+: set secagg=True too")
        for name in ("min_noise_multiplier", "max_clipping_norm"):
            value = getattr(self, name)
            if value is None:
                continue
            if self.dp is None:
                raise ValueError(f"{name} is a DP floor: set dp='central', 'distributed' or 'any'")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value}")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> ClientPolicy:
        """The node operator's policy: ``guard-require-secagg`` (bool),
        ``guard-require-dp`` ("central", "distributed", "any" or ""),
        ``dp-min-noise-multiplier`` (default 0.5; ``guard-min-noise-multiplier`` is a
        deprecated alias), ``guard-max-clipping-norm`` (0 = no limit),
        ``guard-require-dp-sgd`` (bool). The noise floor applies when the node requires
        DP (``guard-require-dp``); distributed DP's client side applies it whenever the
        server announces distributed noise.

        Raises:
            ValueError: for a value of the wrong type or range, naming the key.
        """
        def flag(key: str) -> bool:
            value = node_config.get(key, False)
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if not isinstance(value, bool):
                raise ValueError(f"node config {key} must be true or false, got {value!r}")
            return value

        def number(key: str) -> float | None:
            value = node_config.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"node config {key} must be a number, got {value!r}")
            return float(value) or None

        required = node_config.get(NODE_REQUIRE_DP, "") or ""
        dp = None if required == "" else choice(required, get_args(RequiredDP), NODE_REQUIRE_DP)
        secagg = flag(NODE_REQUIRE_SECAGG) or dp == "distributed"
        return cls(secagg=secagg, dp=dp,
                   min_noise_multiplier=node_min_noise_multiplier(node_config) if dp else None,
                   max_clipping_norm=number(NODE_MAX_CLIPPING_NORM),
                   dpsgd=flag(NODE_REQUIRE_DPSGD))

    def with_node_config(self, node_config: Mapping[str, Any]) -> ClientPolicy:
        """The stricter of this policy and the node operator's (:meth:`from_node_config`)."""
        node = ClientPolicy.from_node_config(node_config)
        dp: Any = self.dp or node.dp
        if self.dp and node.dp and self.dp != node.dp:
            if "any" in (self.dp, node.dp):
                dp = self.dp if node.dp == "any" else node.dp
            else:
                raise ValueError(f"the app requires {self.dp} DP, the node config {node.dp} DP")

        def most(a: float | None, b: float | None, pick: Any) -> float | None:
            return b if a is None else a if b is None else pick(a, b)

        # The node's floor (explicit, or the library default) holds whatever the app says.
        node_floor = node_min_noise_multiplier(node_config) if dp else None
        return ClientPolicy(
            secagg=self.secagg or node.secagg or dp == "distributed", dp=dp,
            min_noise_multiplier=most(self.min_noise_multiplier, node_floor, max),
            max_clipping_norm=most(self.max_clipping_norm, node.max_clipping_norm, min),
            dpsgd=self.dpsgd or node.dpsgd,
        )

    @property
    def requires_anything(self) -> bool:
        return self.secagg or self.dp is not None or self.dpsgd

    def required(self) -> list[str]:
        """The protections this policy requires, as manifest names (for the log)."""
        names = ["secagg"] if self.secagg else []
        if self.dp in ("central", "distributed"):
            names.append(f"{self.dp}-dp")
        elif self.dp == "any":
            names.append("central-dp|distributed-dp")
        if self.dpsgd:
            names.append("dp-sgd (local)")
        return names

    def check(self, manifest: ProtectionManifest, config: Mapping[str, Any]) -> list[str]:
        """Mismatches between this policy and the server's manifest and train config.

        Args:
            manifest: the server's manifest (already parsed and validated).
            config: the train message's ConfigRecord (``dp-clipping-norm``,
                ``dp-noise-multiplier`` are read when DP is required).

        Returns:
            One sentence per mismatch, naming what the server must change; empty when
            the server's strategy meets the policy.
        """
        problems: list[str] = []
        if self.secagg and not manifest.has("secagg"):
            problems.append(
                "this client requires SecAgg+ but the server's strategy does not run it: "
                "pass secagg=SecAgg(...) to GuardedStrategy"
            )
        if manifest.has("update-clipping") and CONFIG_CLIPPING_NORM not in config:
            problems.append(
                f"the manifest announces update clipping but the train config has no "
                f"{CONFIG_CLIPPING_NORM!r}: the server's accounting would assume a bound no "
                "client applies"
            )
        if self.dp is None:
            return problems
        dp = manifest.dp
        if dp is None:
            problems.append(
                f"this client requires {self.dp} user-level DP but the server's strategy runs "
                "none: pass dp=CentralDP(...) or dp=DistributedDP(...) to GuardedStrategy"
            )
            return problems
        if self.dp != "any" and dp.mode != self.dp:
            problems.append(
                f"this client requires {self.dp} DP but the server runs {dp.mode} DP: "
                f"use {'DistributedDP' if self.dp == 'distributed' else 'CentralDP'} in GuardedStrategy"
            )
        adaptive = config.get(CONFIG_ADAPTIVE, False)
        if not isinstance(adaptive, bool) or adaptive != dp.adaptive:
            problems.append(
                f"the train config says {CONFIG_ADAPTIVE}={adaptive!r} but the manifest "
                f"announces adaptive={dp.adaptive}: the server must not change the clipping "
                "mode behind its manifest"
            )
        if dp.mode == "distributed" and adaptive is True:
            problems.append(
                "adaptive clipping under distributed noise would show the server each "
                "client's clipping bit: use fixed clipping with DistributedDP"
            )
        # Under distributed DP the clients add the noise the config says: no fallback to
        # the manifest (a server could announce z and send none).
        z = _number(config.get(CONFIG_NOISE_MULTIPLIER),
                    None if dp.mode == "distributed" else dp.noise_multiplier)
        if z is None:
            problems.append(
                f"the train config lacks {CONFIG_NOISE_MULTIPLIER!r} although the manifest "
                "announces distributed DP"
            )
        elif not z >= (floor := self.min_noise_multiplier or DEFAULT_MIN_NOISE_MULTIPLIER):
            problems.append(
                f"noise multiplier {z:g} is below this client's floor {floor:g} "
                f"({NODE_MIN_NOISE_MULTIPLIER}): raise noise_multiplier on the server"
            )
        c = _number(config.get(CONFIG_CLIPPING_NORM), None)
        if c is None:
            problems.append(
                f"the train config lacks {CONFIG_CLIPPING_NORM!r} although the manifest announces "
                "user-level DP: wrap the strategy with GuardedStrategy(dp=...), not by hand"
            )
        elif self.max_clipping_norm is not None and not c <= self.max_clipping_norm:
            problems.append(
                f"clipping norm {c:g} is above this client's limit {self.max_clipping_norm:g}: "
                "lower clipping_norm on the server"
            )
        return problems


def _number(value: Any, default: float | None) -> float | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan  # compares false with every floor: refused
    return float(value)

"""Telemetry settings from a Flower run config and the environment (no Flower).

Run-config keys (``[tool.flwr.app.config]`` or ``flwr run --run-config``):

=============================  =========  =================================================
key                            default    meaning
=============================  =========  =================================================
``metrics``                    ``true``   start the exporter at all
``metrics-address``            ``""``     ``host`` or ``host:port``; ``""`` =
                                          ``$FLWR_GUARD_METRICS_ADDRESS``, else
                                          ``127.0.0.1:9464``
``metrics-port``               ``0``      overrides the port of the address (0 = keep it)
``pushgateway-url``            ``""``     push after each round and at the end; ``""`` =
                                          ``$FLWR_GUARD_PUSHGATEWAY_URL``, else no push
``metrics-linger``             ``0.0``    seconds to keep serving after the run ends, so a
                                          last scrape sees the final values
``metrics-per-node``           ``false``  also export per-node families (label ``node``)
``metrics-client-statistics``  ``"auto"`` per-client update norms and clipping bits:
                                          ``"on"``, ``"off"``, or ``"auto"`` (on unless a
                                          DP wrapper is in the strategy chain)
``dp-sgd-max-epsilon``         absent     record-level budget shown next to the worst
                                          client's DP-SGD epsilon
``dp-sgd-delta``               absent     delta of the record-level epsilon
=============================  =========  =================================================

The environment variables are what the deployment files set (deploy/compose,
deploy/k8s): a run config that leaves a key empty defers to the deployment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr_guard.keys import RunConfig
from flwr_guard.telemetry.exporter import DEFAULT_HOST, DEFAULT_PORT, Address

ADDRESS_ENV = "FLWR_GUARD_METRICS_ADDRESS"
PUSHGATEWAY_ENV = "FLWR_GUARD_PUSHGATEWAY_URL"
CLIENT_STATISTICS = ("auto", "on", "off")


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    return bool(value)


@dataclass(frozen=True)
class TelemetryConfig:
    """Resolved telemetry settings (see the module docstring for the keys).

    Attributes:
        enabled: whether to serve metrics over HTTP.
        address: where to serve them.
        pushgateway_url: Pushgateway to push to, or ``None``.
        linger_s: seconds to keep serving after the run.
        per_node: export per-node families.
        client_statistics: ``True``/``False``, or ``None`` for automatic.
        record_epsilon_budget: record-level budget, or ``None``.
        record_delta: delta of the record-level epsilon, or ``None``.
    """

    enabled: bool = True
    address: Address = Address(DEFAULT_HOST, DEFAULT_PORT)
    pushgateway_url: str | None = None
    linger_s: float = 0.0
    per_node: bool = False
    client_statistics: bool | None = None
    record_epsilon_budget: float | None = None
    record_delta: float | None = None

    @classmethod
    def from_run_config(
        cls, run_config: Mapping[str, Any], environ: Mapping[str, str] | None = None
    ) -> TelemetryConfig:
        """Resolve the settings.

        Raises:
            ValueError: naming the key with an invalid value.
        """
        env = os.environ if environ is None else environ
        try:
            text = str(run_config.get(RunConfig.METRICS_ADDRESS, "") or env.get(ADDRESS_ENV, "")
                       or f"{DEFAULT_HOST}:{DEFAULT_PORT}")
            address = Address.parse(text)
            port = int(run_config.get(RunConfig.METRICS_PORT, 0) or 0)
            if not 0 <= port <= 65535:
                raise ValueError(f"{RunConfig.METRICS_PORT} must be in 0..65535, got {port}")
            if port:
                address = Address(address.host, port)
            linger = float(run_config.get(RunConfig.METRICS_LINGER, 0.0))
            if not (linger >= 0 and linger < 3600):
                raise ValueError(f"{RunConfig.METRICS_LINGER} must be in [0, 3600) seconds, got {linger}")
            mode = str(run_config.get(RunConfig.METRICS_CLIENT_STATISTICS, "auto")).strip().lower()
            if mode not in CLIENT_STATISTICS:
                raise ValueError(
                    f"{RunConfig.METRICS_CLIENT_STATISTICS} must be one of {CLIENT_STATISTICS}, got {mode!r}"
                )
            budget = run_config.get(RunConfig.DP_SGD_MAX_EPSILON)
            delta = run_config.get(RunConfig.DP_SGD_DELTA)
            url = str(run_config.get(RunConfig.PUSHGATEWAY_URL, "") or env.get(PUSHGATEWAY_ENV, "")).strip()
            return cls(
                enabled=_bool(run_config.get(RunConfig.METRICS, True)),
                address=address,
                pushgateway_url=url or None,
                linger_s=linger,
                per_node=_bool(run_config.get(RunConfig.METRICS_PER_NODE, False)),
                client_statistics=None if mode == "auto" else mode == "on",
                record_epsilon_budget=None if budget in ("", 0, 0.0) else _optional_float(budget),
                record_delta=None if delta == "" else _optional_float(delta),
            )
        except ValueError as err:
            raise ValueError(f"telemetry run config: {err}") from err


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)

"""flwr-guard's Prometheus metric families, in a dedicated ``CollectorRegistry`` (no Flower).

Names follow Prometheus' naming rules (https://prometheus.io/docs/practices/naming/):
the ``flwr_guard_`` prefix, base units in the name (``_seconds``, ``_bytes``,
``_decibels``, ``_ratio``), ``_total`` on counters (prometheus-client appends it),
histograms where a distribution matters. docs/metrics.md lists every family with its
type, unit, labels and meaning; :data:`FAMILIES` is the same list in code, and the tests
check that the two agree with what the exporter really serves.

Labels stay low-cardinality: every family carries ``run`` (Flower run id) and
``strategy`` (the innermost strategy class, e.g. ``FedAvg``); SecAgg+ families add
``stage`` (six protocol stages plus ``unmask-compute``), a few add a small fixed enum
(``phase``, ``level``, ``outcome``). Per-node families (label ``node``) exist only in a
registry built with ``per_node=True``. Nothing is ever labelled per example.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from flwr_guard.telemetry.family import PREFIX, RUN_LABELS, Family, family
from flwr_guard.telemetry.robustness import ROBUST_FAMILIES

# Bucket bounds (upper, inclusive), chosen for what each family measures.
STAGE_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ROUND_SECONDS_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
NORM_BUCKETS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
PSNR_BUCKETS = (5.0, 10.0, 12.5, 15.0, 17.5, 20.0, 22.5, 25.0, 30.0, 40.0, 50.0)
UNIT_INTERVAL_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


_f = family


FAMILIES: tuple[Family, ...] = (
    # --- run and rounds ---------------------------------------------------------------
    _f("run_info", "info", "-", ("chain", "protections"),
       "The run being exported (value 1): strategy chain and protections in force."),
    _f("round", "gauge", "round number", (),
       "Last federated round whose training the server finished (0 before the first)."),
    _f("rounds_planned", "gauge", "rounds", (),
       "Rounds the run was started with (num_rounds of Strategy.start)."),
    _f("rounds_total", "counter", "rounds", ("outcome",),
       "Training rounds by outcome: aggregated (a new model), failed (no aggregate: too "
       "few replies, SecAgg+ aborted) or skipped (nothing sent, e.g. privacy budget)."),
    _f("round_duration_seconds", "histogram", "seconds", (),
       "Wall-clock time of a training round, from configure_train to the aggregate."),
    _f("clients_sampled_total", "counter", "clients", (),
       "Clients sampled into training cohorts (summed over rounds)."),
    _f("clients_replied_total", "counter", "clients", (),
       "Clients whose training reply reached the aggregate (summed over rounds)."),
    _f("round_clients_sampled", "gauge", "clients", (),
       "Clients sampled into the last training round's cohort."),
    _f("round_clients_replied", "gauge", "clients", (),
       "Clients of the last training round whose reply reached the aggregate."),
    # --- training progress ------------------------------------------------------------
    _f("loss", "gauge", "model loss", ("phase",),
       "Loss of the global model: phase=train (clients' aggregated training loss), "
       "evaluate (clients' aggregated evaluation), server (server-side evaluation)."),
    _f("accuracy_ratio", "gauge", "ratio in [0, 1]", ("phase",),
       "Accuracy of the global model, phase=evaluate or server (as for flwr_guard_loss)."),
    # --- SecAgg+ ----------------------------------------------------------------------
    _f("secagg_dropouts_total", "counter", "clients", ("stage",),
       "Clients lost at each SecAgg+ stage (dropped, timed out or excluded)."),
    _f("secagg_stage_duration_seconds", "histogram", "seconds", ("stage",),
       "Server-side wall-clock time of each SecAgg+ stage (unmask-compute: removing masks)."),
    _f("secagg_sent_bytes_total", "counter", "bytes", ("stage",),
       "Payload bytes the server sent to clients at each SecAgg+ stage."),
    _f("secagg_received_bytes_total", "counter", "bytes", ("stage",),
       "Payload bytes the server received from clients at each SecAgg+ stage."),
    _f("secagg_aborted_rounds_total", "counter", "rounds", (),
       "SecAgg+ rounds that could not complete (fewer clients than the threshold)."),
    _f("secagg_cohort_clients", "gauge", "clients", (),
       "Clients sampled into the last SecAgg+ round."),
    _f("secagg_surviving_clients", "gauge", "clients", (),
       "Clients whose masked input the last SecAgg+ round summed (0 if it aborted)."),
    _f("secagg_reconstruction_threshold", "gauge", "clients", (),
       "t of the last SecAgg+ round: the fewest clients a stage may keep."),
    _f("secagg_num_shares", "gauge", "clients", (),
       "k of the last SecAgg+ round: neighbours holding shares of each client's secrets."),
    _f("secagg_key_setups_total", "counter", "set-ups", (),
       "SecAgg+ key set-ups (advertise and roster stages): every round without multi-round "
       "sessions, the first round of each session with them."),
    _f("secagg_clipped_values_total", "counter", "coordinates", (),
       "Update coordinates clipped to the SecAgg+ clipping range before quantisation."),
    _f("modular_wraparounds_total", "counter", "coordinates", (),
       "Coordinates of a modular sum that wrapped around the modulus (decoded wrongly)."),
    # --- differential privacy ---------------------------------------------------------
    _f("dp_epsilon", "gauge", "epsilon", ("level",),
       "Privacy spent: level=user (DP-FedAvg's accountant on the server), level=record "
       "(DP-SGD: the largest epsilon any client reported, i.e. the worst client)."),
    _f("dp_epsilon_budget", "gauge", "epsilon", ("level",),
       "Maximum epsilon allowed at the same delta and level (+Inf: no budget)."),
    _f("dp_delta", "gauge", "probability", ("level",),
       "delta at which flwr_guard_dp_epsilon is stated."),
    _f("dp_budget_exhausted", "gauge", "boolean (0/1)", (),
       "1 once the server refused a round because it would exceed the user-level budget."),
    _f("dp_noise_multiplier", "gauge", "ratio (std / clipping norm)", (),
       "z of DP-FedAvg: noise standard deviation of the sum over the clipping norm."),
    _f("dp_clipping_norm", "gauge", "L2 norm (model units)", (),
       "Clipping norm C the clients used in the last round."),
    _f("dp_noise_stddev", "gauge", "model units", (),
       "Standard deviation of the Gaussian noise added to the last round's mean."),
    _f("update_l2_norm", "histogram", "L2 norm (model units)", (),
       "L2 norm of each client update the server saw in the clear (client statistic: "
       "only with client statistics on)."),
    _f("clipped_updates_ratio", "gauge", "ratio in [0, 1]", (),
       "Fraction of the last round's client updates that clipping changed (client "
       "statistic, or the DP-noised fraction when the DP wrapper reports one)."),
    # --- leakage audit and inspector --------------------------------------------------
    _f("audits_total", "counter", "audits", (),
       "Gradient-leakage audits that clients ran and reported."),
    _f("audit_psnr_decibels", "histogram", "dB", (),
       "PSNR of each audit's best reconstruction against the client's own data."),
    _f("audit_ssim", "histogram", "SSIM in [-1, 1]", (),
       "SSIM of each audit's best reconstruction against the client's own data."),
    _f("audit_identification_ratio", "histogram", "ratio in [0, 1]", (),
       "Share of the audited images whose reconstruction identifies the victim."),
    _f("audit_worst_psnr_decibels", "gauge", "dB", (),
       "Highest audit PSNR of the run so far (the worst case for privacy)."),
    _f("audit_worst_psnr_gain_decibels", "gauge", "dB", (),
       "Highest audit PSNR gain over the no-information (mean-image) baseline so far."),
    _f("audit_worst_ssim", "gauge", "SSIM", (),
       "Highest audit SSIM of the run so far."),
    _f("audit_worst_identification_ratio", "gauge", "ratio in [0, 1]", (),
       "Highest audit identification rate of the run so far."),
    _f("audit_leak_verdicts_total", "counter", "audits", (),
       "Audits whose verdict was 'leaks' (see docs/audit.md for the rule)."),
    _f("audit_blocked_updates_total", "counter", "updates", (),
       "Updates that the audit gate dropped because they leaked (error replies)."),
    _f("audit_errors_total", "counter", "audits", (),
       "Audits that could not run or failed on the client (refused, or sent unaudited)."),
    _f("inspector_violations_total", "counter", "violations", (),
       "Reply-inspection findings (extra arrays, per-example data in metrics, ...): the "
       "server-side ReplyGuard's findings, plus one per reply a client's inspection blocked."),
)

# Per-node families: only with per_node=True (small deployments: one series per node).
NODE_FAMILIES: tuple[Family, ...] = (
    _f("node_train_replies_total", "counter", "replies", ("node", "status"),
       "Training replies per node: status=ok (reached the aggregate) or error."),
    _f("node_dp_record_epsilon", "gauge", "epsilon", ("node",),
       "Record-level (DP-SGD) epsilon the node reported last."),
    _f("node_audit_psnr_decibels", "gauge", "dB", ("node",),
       "PSNR of the node's last audit."),
)


def _base(name: str, kind: str) -> str:
    """The name prometheus-client is constructed with (it appends ``_total``/``_info``)."""
    if kind == "counter":
        return name.removesuffix("_total")
    if kind == "info":
        return name.removesuffix("_info")
    return name


_BUCKETS = {
    PREFIX + "round_duration_seconds": ROUND_SECONDS_BUCKETS,
    PREFIX + "secagg_stage_duration_seconds": STAGE_SECONDS_BUCKETS,
    PREFIX + "update_l2_norm": NORM_BUCKETS,
    PREFIX + "audit_psnr_decibels": PSNR_BUCKETS,
    PREFIX + "audit_ssim": UNIT_INTERVAL_BUCKETS,
    PREFIX + "audit_identification_ratio": UNIT_INTERVAL_BUCKETS,
}


class GuardMetrics:
    """Every flwr-guard metric family, registered in one ``CollectorRegistry``.

    Args:
        registry: where to register; ``None`` = a new, dedicated registry (never
            prometheus-client's global one, so that two strategies in one process, or
            Flower's own process, never clash).
        per_node: also register :data:`NODE_FAMILIES` (label ``node``).

    Families are reachable by their exposed name without the prefix and suffix-free
    for counters, e.g. ``metrics["rounds"]``, ``metrics["dp_epsilon"]``.
    """

    def __init__(self, registry: CollectorRegistry | None = None, per_node: bool = False) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.per_node = per_node
        self._families: dict[str, Counter | Gauge | Histogram | Info] = {}
        for fam in FAMILIES + (NODE_FAMILIES if per_node else ()) + ROBUST_FAMILIES:
            self._families[_base(fam.name, fam.kind).removeprefix(PREFIX)] = _create(
                fam, self.registry
            )

    def __getitem__(self, key: str) -> Counter | Gauge | Histogram | Info:
        return self._families[key]

    def __contains__(self, key: str) -> bool:
        return key in self._families

    @property
    def families(self) -> tuple[Family, ...]:
        """The families registered here."""
        return FAMILIES + (NODE_FAMILIES if self.per_node else ()) + ROBUST_FAMILIES


def _create(family: Family, registry: CollectorRegistry) -> Counter | Gauge | Histogram | Info:
    name = _base(family.name, family.kind)
    if family.kind == "counter":
        return Counter(name, family.help, family.labels, registry=registry)
    if family.kind == "gauge":
        return Gauge(name, family.help, family.labels, registry=registry)
    if family.kind == "histogram":
        return Histogram(name, family.help, family.labels, registry=registry,
                         buckets=_BUCKETS[family.name])
    if family.kind == "info":
        # The extra labels (chain, protections) are the Info's value, set once per run.
        return Info(name, family.help, RUN_LABELS, registry=registry)
    raise ValueError(f"unknown metric kind {family.kind!r}")

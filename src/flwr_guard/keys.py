"""Every configuration key and metric name flwr-guard reads or writes (standard library only).

One class per role, in Flower's idiom (``flwr.common.secure_aggregation.
secaggplus_constants``: classes of string constants that cannot be instantiated):

- :class:`RunConfig`: keys a ServerApp or ClientApp reads from the run config
  (``[tool.flwr.app.config]`` or ``flwr run --run-config``), i.e. what the run
  submitter, and so possibly the adversary, chooses;
- :class:`NodeConfig`: keys a SuperNode's operator sets (``flower-supernode
  --node-config``): the node's own policy, which the run config may tighten, never loosen;
- :class:`TrainConfig`: keys the server puts in the train message's ConfigRecord;
- :class:`ReplyMetrics`: keys a client puts in its reply's MetricRecord;
- :class:`ServerMetrics`: keys the server-side wrappers put in the aggregated metrics,
  and those of the ServerApp's own robustness evaluation.

A key used in several roles is a constant of each class it is used in, with the same
string (the later class refers to the earlier constant). Every key of :class:`RunConfig`
and :class:`NodeConfig` is listed in a table of the docs (``tests/test_keys.py``).
SecAgg+'s wire vocabulary (stages and message record keys) lives in
:mod:`flwr_guard.secagg`, not here.
"""

from __future__ import annotations

__all__ = ["NodeConfig", "ReplyMetrics", "RunConfig", "ServerMetrics", "TrainConfig"]


class _Namespace:
    """A class of constants; never instantiated."""

    def __new__(cls) -> _Namespace:
        """Prevent instantiation."""
        raise TypeError(f"{cls.__name__} cannot be instantiated.")


class RunConfig(_Namespace):
    """Run-config keys (the server's side; docs: privacy.md, secagg.md, metrics.md,
    reference-app.md)."""

    # DP-FedAvg, user-level DP (flwr_guard.dp.strategy.DPFedAvg.from_run_config)
    DP_NOISE_MULTIPLIER = "dp-noise-multiplier"  # z = noise std / clipping norm (required)
    DP_CLIPPING_NORM = "dp-clipping-norm"  # C, L2 bound of an update, model units (required)
    DP_EXPECTED_CONTRIBUTORS = "dp-expected-contributors"  # n, fixed denominator of the mean (required)
    DP_MAX_EPSILON = "dp-max-epsilon"  # user-level budget at dp-delta (0 = no limit)
    DP_DELTA = "dp-delta"  # delta of the user-level epsilon (default 1e-5)
    DP_SAMPLING = "dp-sampling"  # "none", "poisson" or "fixed-size"
    DP_SAMPLE_RATE = "dp-sample-rate"  # q, client sampling probability (0 = not given)
    DP_POPULATION = "dp-population"  # clients in the population (fixed-size sampling; 0 = not given)
    DP_ACCOUNTANT = "dp-accountant"  # "rdp" or "pld"
    DP_CHECKPOINT = "dp-checkpoint"  # privacy ledger file ("" = default path, "none" = memory only)
    DP_SECURE_NOISE = "dp-secure-noise"  # bool: central integer Skellam noise
    DP_ADAPTIVE_CLIPPING = "dp-adaptive-clipping"  # bool: Andrew et al. 2021 adaptive clipping
    DP_TARGET_QUANTILE = "dp-target-quantile"  # adaptive clipping's target quantile (0.5)
    DP_CLIP_LEARNING_RATE = "dp-clip-learning-rate"  # adaptive clipping's learning rate (0.2)
    DP_CLIPPED_COUNT_STDDEV = "dp-clipped-count-stddev"  # noise std of the clipped count (0 = n / 20)
    DP_DISTRIBUTED = "dp-distributed"  # bool: the clients add the noise (under SecAgg+)
    DP_MIN_CONTRIBUTORS = "dp-min-contributors"  # distributed DP: contributors the noise is sized for
    DP_QUANTIZATION_STEP = "dp-quantization-step"  # distributed DP: lattice step, model units
    DP_RELATION = "dp-relation"  # distributed DP's neighbouring relation: "add-remove" or "zero-out"

    # DP-SGD, record-level DP (flwr_guard.dp.dpsgd.DPSGDConfig.from_run_config)
    DP_SGD = "dp-sgd"  # bool: the reference app trains with DP-SGD
    DP_SGD_NOISE_MULTIPLIER = "dp-sgd-noise-multiplier"  # sigma = noise std / max grad norm (required)
    DP_SGD_MAX_GRAD_NORM = "dp-sgd-max-grad-norm"  # per-example L2 clipping norm (required)
    DP_SGD_DELTA = "dp-sgd-delta"  # delta of the record-level epsilon (default 1e-5)
    DP_SGD_GHOST_CLIPPING = "dp-sgd-ghost-clipping"  # bool: Opacus ghost clipping
    DP_SGD_ACCOUNTANT = "dp-sgd-accountant"  # Opacus accountant: "rdp" or "prv"
    DP_SGD_SECURE_MODE = "dp-sgd-secure-mode"  # bool: Opacus' CSPRNG noise (needs torchcsprng)
    DP_SGD_MAX_EPSILON = "dp-sgd-max-epsilon"  # record-level budget at dp-sgd-delta (0 = the node's cap)

    # SecAgg+ (flwr_guard.guard.strategy.SecAgg.from_run_config)
    SECAGG = "secagg"  # bool: SecAgg+ around the strategy (default true)
    SECAGG_NUM_SHARES = "secagg-num-shares"  # k, shares per secret (0 = chosen per cohort)
    SECAGG_RECONSTRUCTION_THRESHOLD = "secagg-reconstruction-threshold"  # t (0 = chosen per cohort)
    SECAGG_CLIPPING_RANGE = "secagg-clipping-range"  # values clipped to [-r, r], model units
    SECAGG_QUANTIZATION_RANGE = "secagg-quantization-range"  # quantisation levels of [-r, r]
    SECAGG_TIMEOUT = "secagg-timeout"  # seconds to wait for one stage's replies
    SECAGG_MULTI_ROUND = "secagg-multi-round"  # bool: keys set up once per cohort
    SECAGG_MAX_COLLUDERS = "secagg-max-colluders"  # C the default threshold is chosen for (-1 = derived)

    # Leakage audit (the reference app, flwr_guard.apps.digits.leakage_audit)
    AUDIT = "audit"  # bool: the reference app runs the leakage audit
    AUDIT_ROUND_FRACTION = "audit-round-fraction"  # share of rounds audited, [0, 1]
    AUDIT_CLIENT_FRACTION = "audit-client-fraction"  # share of clients audited in such a round, [0, 1]
    AUDIT_EFFORT = "audit-effort"  # attack effort, [0, 1]
    AUDIT_TIME_BUDGET = "audit-time-budget"  # seconds per audit, all attacks together
    AUDIT_GATE = "audit-gate"  # bool: refuse to send an update whose verdict is "leaks"

    # Robust training (flwr_guard.robust.objectives.RobustObjective.from_run_config)
    ROBUST_OBJECTIVE = "robust-objective"  # "plain", "cure", "scorpio" or "pgd-at"
    ROBUST_EPS = "robust-eps"  # L-inf radius, pixels in [0, 1]
    ROBUST_LAMBDA = "robust-lambda"  # weight of the curvature term (cure, scorpio)
    ROBUST_STEPS = "robust-steps"  # PGD steps (pgd-at) / fixed-point steps (scorpio)
    # Robustness evaluation (flwr_guard.robust.server_eval.RobustnessEvaluator.from_run_config)
    ROBUST_EVAL_EVERY = "robust-eval-every"  # evaluate every k rounds (0 = never)
    ROBUST_EVAL_EXAMPLES = "robust-eval-examples"  # held-out examples evaluated
    ROBUST_EVAL_EPS = "robust-eval-eps"  # comma-separated L-inf radii, pixels in (0, 1)
    ROBUST_EVAL_PGD_STEPS = "robust-eval-pgd-steps"  # PGD steps
    ROBUST_EVAL_ZO_EXAMPLES = "robust-eval-zo-examples"  # examples for the zeroth-order attacks
    ROBUST_EVAL_ATTRIBUTION_EXAMPLES = "robust-eval-attribution-examples"  # examples for attributions (0 = none)

    # Telemetry (flwr_guard.telemetry.config.TelemetryConfig.from_run_config)
    METRICS = "metrics"  # bool: start the Prometheus exporter
    METRICS_ADDRESS = "metrics-address"  # "host" or "host:port" ("" = the environment's)
    METRICS_PORT = "metrics-port"  # port overriding the address's (0 = keep it)
    METRICS_LINGER = "metrics-linger"  # seconds to keep serving after the run
    METRICS_PER_NODE = "metrics-per-node"  # bool: also export per-node families
    METRICS_CLIENT_STATISTICS = "metrics-client-statistics"  # "on", "off" or "auto"
    PUSHGATEWAY_URL = "pushgateway-url"  # Pushgateway to push to ("" = the environment's)


class NodeConfig(_Namespace):
    """Node-config keys: the node operator's policy (docs: privacy.md, secagg.md,
    deploy.md, quickstart.md, audit.md)."""

    # Differential privacy (flwr_guard.dp.node_policy)
    DP_MIN_NOISE_MULTIPLIER = "dp-min-noise-multiplier"  # user-level floor on z (default 0.5)
    GUARD_MIN_NOISE_MULTIPLIER = "guard-min-noise-multiplier"  # deprecated alias of dp-min-noise-multiplier
    DP_HONEST_CONTRIBUTORS = "dp-honest-contributors"  # distributed DP: honest noise assumed (default 3)
    DP_SGD_MIN_NOISE_MULTIPLIER = "dp-sgd-min-noise-multiplier"  # DP-SGD floor on sigma (default 0.5)
    DP_SGD_MAX_EPSILON = RunConfig.DP_SGD_MAX_EPSILON  # record-level budget cap (default 10)
    DP_SGD_SECURE_MODE = RunConfig.DP_SGD_SECURE_MODE  # bool: force Opacus' secure mode on
    DP_SGD_LEDGER = "dp-sgd-ledger"  # directory of the node's DP-SGD ledgers
    DP_SGD_DATA_SOURCE = "dp-sgd-data-source"  # the ledger's id: the data source a budget belongs to
    DP_SGD_LEDGER_RESET = "dp-sgd-ledger-reset"  # retired: refused, naming `flwr-guard ledger init --force`
    PARTITION_ID = "partition-id"  # Flower's own (simulation): default data source partition-<id>

    # The client guard's requirements (flwr_guard.guard.policy)
    GUARD_REQUIRE_SECAGG = "guard-require-secagg"  # bool: no update leaves unless SecAgg+ masks it
    GUARD_REQUIRE_DP = "guard-require-dp"  # "central", "distributed" or "any": user-level DP required
    GUARD_MAX_CLIPPING_NORM = "guard-max-clipping-norm"  # largest clipping norm accepted (0 = none)
    GUARD_REQUIRE_DP_SGD = "guard-require-dp-sgd"  # bool: every update trained under private_training

    # The node guard's FAB allow-list (flwr_guard.node.allowlist)
    GUARD_FAB_ALLOWLIST = "guard-fab-allowlist"  # TOML file of FAB hashes and trusted keys
    GUARD_FAB_HASHES = "guard-fab-hashes"  # comma-separated FAB SHA-256 pins (hex)
    GUARD_FAB_TRUSTED_KEYS = "guard-fab-trusted-keys"  # comma-separated Ed25519 publisher keys (hex)
    GUARD_FAB_ALLOW_ANY = "guard-fab-allow-any"  # bool: run any FAB (the policy mods still hold)
    GUARD_TRAP_CHECK = "guard-trap-check"  # bool: structural trap check of the received model (default true)
    GUARD_APP_TIMEOUT = "guard-app-timeout"  # seconds one message's app may run before it is killed (1800)

    # Prefixes of the keys the node's policy owns (the node guard never shows them to the app)
    GUARD_PREFIX = "guard-"  # every node-guard and client-guard key starts so
    SECAGG_PREFIX = "secagg-"  # every SecAgg+ node-config key starts so

    # Leakage audit (flwr_guard.audit.audit_mod)
    AUDIT_ON_FAILURE = "audit-on-failure"  # "refuse": an audit that fails sends nothing

    # SecAgg+ policy (flwr_guard.secagg.policy reads these; same strings there)
    SECAGG_SIGNING_KEY = "secagg-signing-key"  # file with the node's Ed25519 signing key
    SECAGG_ROSTER = "secagg-roster"  # federation roster file (JSON or TOML)
    SECAGG_ROSTER_ADMIN_KEY = "secagg-roster-admin-key"  # hex Ed25519 key that signs the roster
    SECAGG_TRUST_ON_FIRST_USE = "secagg-trust-on-first-use"  # bool: run without a roster, pinning keys
    SECAGG_MIN_COHORT = "secagg-min-cohort"  # smallest cohort n (default 3)
    SECAGG_MIN_NUM_SHARES = "secagg-min-num-shares"  # smallest k (default 2)
    SECAGG_MIN_RECONSTRUCTION_THRESHOLD = "secagg-min-reconstruction-threshold"  # smallest t (default 2)
    SECAGG_MAX_COLLUDERS = RunConfig.SECAGG_MAX_COLLUDERS  # C, colluding federation members (absolute)
    SECAGG_CORRUPT_FRACTION = "secagg-corrupt-fraction"  # gamma: colluding share of the roster (0.05)
    SECAGG_MIN_HONEST_OTHERS = "secagg-min-honest-others"  # h: honest inputs besides the node's own
    SECAGG_MAX_SESSION_ROUNDS = "secagg-max-session-rounds"  # rounds one multi-round session may span
    SECAGG_MAX_SESSION_SECONDS = "secagg-max-session-seconds"  # seconds from a session's opening to an input
    SECAGG_ROUND_LEDGER = "secagg-round-ledger"  # file: last round each session sent (rollback guard)
    SECAGG_DROPOUT_FRACTION = "secagg-dropout-fraction"  # delta: planned dropout share (1/3)
    SECAGG_SECURITY_BITS = "secagg-security-bits"  # sigma: privacy failure probability <= 2^-sigma


class TrainConfig(_Namespace):
    """Keys of the train message's ConfigRecord (server -> client), written by
    :class:`~flwr_guard.dp.strategy.DPFedAvg`, checked by the client's mods."""

    DP_CLIPPING_NORM = RunConfig.DP_CLIPPING_NORM  # C the client clips its update to, model units
    DP_ADAPTIVE_CLIPPING = RunConfig.DP_ADAPTIVE_CLIPPING  # bool: report the unclipped bit
    DP_WEIGHT_KEY = "dp-weight-key"  # the reply metric the strategy weighs by ("" = none)
    DP_DISTRIBUTED = RunConfig.DP_DISTRIBUTED  # bool: the client adds distributed noise
    DP_NOISE_MULTIPLIER = RunConfig.DP_NOISE_MULTIPLIER  # z of the noise (distributed DP)
    DP_MIN_CONTRIBUTORS = RunConfig.DP_MIN_CONTRIBUTORS  # contributors the noise is sized for
    DP_QUANTIZATION_STEP = RunConfig.DP_QUANTIZATION_STEP  # lattice step of the noise, model units


class ReplyMetrics(_Namespace):
    """Keys of a train reply's MetricRecord (client -> server)."""

    # Update clipping and distributed DP (integers, so that SecAgg+ can sum them masked)
    DP_UNCLIPPED_COUNT = "dp-unclipped-count"  # Andrew et al.'s bit 1[||update|| <= C]
    DP_CLIPPED_COUNT = "dp-clipped-count"  # 1: this reply went through update_clipping_mod
    DP_NOISED_COUNT = "dp-noised-count"  # 1: this client added its distributed-DP noise
    # DP-SGD
    DP_SGD_EPSILON = "dp-sgd-epsilon"  # the client's record-level epsilon so far
    DP_SGD_DELTA = RunConfig.DP_SGD_DELTA  # the delta of that epsilon

    # Leakage audit (flwr_guard.audit.report.AuditReport.to_metrics; docs/audit.md)
    AUDIT_PREFIX = "audit-"  # every audit key starts so (for filtering, never to build a key)
    AUDIT_RAN = "audit-ran"  # 1 if this reply was audited
    AUDIT_ERROR = "audit-error"  # 1 if an audit was due and failed
    AUDIT_LEAKS = "audit-leaks"  # 1 if the verdict is "leaks"
    AUDIT_PSNR_DB = "audit-psnr-db"  # worst-case mean PSNR over the victims, dB
    AUDIT_PSNR_GAIN_DB = "audit-psnr-gain-db"  # that minus the mean-image baseline's PSNR, dB
    AUDIT_SSIM = "audit-ssim"  # worst-case mean SSIM
    AUDIT_IDENTIFIED_RATE = "audit-identified-rate"  # share of victims identified
    AUDIT_LABEL_ACCURACY = "audit-label-accuracy"  # share of victims whose label was recovered
    AUDIT_BASELINE_PSNR_DB = "audit-baseline-psnr-db"  # mean-image baseline PSNR, dB
    AUDIT_REL_L2_ERROR = "audit-rel-l2-error"  # worst-case (smallest) mean relative L2 error
    AUDIT_COSINE = "audit-cosine"  # worst-case mean cosine similarity
    AUDIT_RECOVERED_FRACTION = "audit-recovered-fraction"  # worst-case mean share of features recovered
    AUDIT_TOKEN_F1 = "audit-token-f1"  # worst-case mean token-recovery F1 (text)
    AUDIT_SECONDS = "audit-seconds"  # wall time of the audit, seconds

    # Reply inspection
    INSPECTOR_VIOLATIONS = "inspector-violations"  # findings a client reports about its own reply
    # Robust training (the reference app)
    ROBUST_TRAIN_SECONDS_PER_STEP = "robust-train-seconds-per-step"  # seconds per training step


class ServerMetrics(_Namespace):
    """Keys of the aggregated train metrics the server-side wrappers write, and of the
    ServerApp's own robustness evaluation (docs/metrics.md, docs/robustness.md)."""

    # DP-FedAvg (flwr_guard.dp.strategy)
    DP_EPSILON = "dp-epsilon"  # user-level epsilon spent so far
    DP_CLIPPING_NORM = RunConfig.DP_CLIPPING_NORM  # clipping norm used this round, model units
    DP_NOISE_STD = "dp-noise-std"  # std of the noise added to the mean, model units
    DP_UNCLIPPED_FRACTION = "dp-unclipped-fraction"  # DP-noised unclipped fraction (read if present)
    DP_WRAPAROUNDS = "dp-wraparounds"  # modular wrap-arounds of the sum (read if present)
    SECAGG_WRAPAROUNDS = "secagg-wraparounds"  # modular wrap-arounds of the SecAgg+ sum
    # Leakage audit summary (flwr_guard.audit.summary): the ReplyMetrics audit keys, worst case
    AUDIT_BLOCKED = "audit-blocked"  # updates the audit gate blocked this round

    # Robustness evaluation (flwr_guard.robust.server_eval)
    ROBUST_ACCURACY_PREFIX = "robust-acc-"  # robust-acc-<attack>-<eps>: accuracy under attack, ratio
    ROBUST_ACCURACY_CLEAN = "robust-acc-none-0"  # accuracy without attack, ratio
    ROBUST_ATTRIBUTION_PREFIX = "robust-attr-"  # robust-attr-<method>-<score>: attribution score
    ROBUST_MASKING_SUSPECTED = "robust-masking-suspected"  # 1.0 if gradient masking is suspected
    ROBUST_EVAL_SECONDS = "robust-eval-seconds"  # wall time of the evaluation, seconds

    @staticmethod
    def robust_accuracy(attack: str, eps: float) -> str:
        """``robust-acc-<attack>-<eps:g>``: accuracy under ``attack`` at L-inf radius ``eps``."""
        return f"{ServerMetrics.ROBUST_ACCURACY_PREFIX}{attack}-{eps:g}"

    @staticmethod
    def robust_attribution(method: str, score: str) -> str:
        """``robust-attr-<method>-<score>``: an attribution score of ``method``."""
        return f"{ServerMetrics.ROBUST_ATTRIBUTION_PREFIX}{method}-{score}"

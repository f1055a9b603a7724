"""The leakage-audit client mod: attack what would leave the device, report scores.

Usage (see docs/audit.md for the order with clipping, DP noise and SecAgg+ mods)::

    audit = leakage_audit_mod(
        model_fn=lambda: DigitsCNN(),
        data_fn=lambda context: my_local_images_and_labels(context),
        config=LeakageAuditConfig(plan=AuditPlan(protections=Protections(clipping_norm=1.0))),
    )

    @app.train(mods=[secaggplus_mod, audit, clipping_mod])
    def train(msg, context): ...

On a train message the mod lets the rest of the app run, then — on a sampled
(round, client) pair (:class:`~flwr_guard.audit.sampling.AuditSampling`) — takes a batch
of the client's own data, builds the update the server would see under the declared
protections, runs the attacks within the time budget, scores them against the batch
(:func:`~flwr_guard.audit.audit.run_audit`) and writes the scores into the reply's
MetricRecord. Every train reply gets the same ``audit-*`` keys (neutral values and
``audit-ran = 0`` when not sampled), as FedAvg requires.

With ``gate=True`` an update whose verdict is "leaks" is not sent: the reply becomes a
Flower error reply (``ErrorCode.MOD_FAILED_PRECONDITION``, reason starting with
:data:`BLOCKED_REASON`). Flower's strategies skip error replies — FedAvg averages the
others, and keeps the previous model if every reply of a round is an error — so the
round goes on. (A zero update with ``num-examples = 0`` would also be ignored by the
average, but FedAvg divides by zero when every reply weighs 0.)

Loud failure. On the first train message of the process the mod checks that the audit
can run at all — ``model_fn()`` loads the received weights, ``data_fn`` returns a
supported form (:mod:`flwr_guard.audit.inputs`) and the model runs on two of its samples
— whether or not the round is sampled. A check or an audit that fails is handled by
``on_failure``: ``"refuse"`` (default) sends no update: the reply is an error whose
reason starts with :data:`flwr_guard.guard.client_mod.POLICY_REFUSAL` and names the
cause (type and shape of the offending input), so that the server's log shows it;
``"send"`` sends the update unaudited with ``audit-error = 1``. The node operator may
force ``"refuse"`` with node config ``audit-on-failure = "refuse"`` (never ``"send"``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode
from torch import nn

from flwr_guard.audit.audit import AuditPlan, _check_model, run_audit
from flwr_guard.audit.inputs import as_pair, prepare
from flwr_guard.audit.protections import Protections
from flwr_guard.audit.report import AuditReport, neutral_metrics
from flwr_guard.audit.sampling import AuditSampling, derived_seed
from flwr_guard.guard.client_mod import refusal
from flwr_guard.keys import NodeConfig, ReplyMetrics, TrainConfig
from flwr_guard.records import (
    BLOCK_PREFIX,
    first_array_record,
    message_kind,
    reply_metric_record,
    server_round,
)
from flwr_guard.update import model_update, update_norm

logger = logging.getLogger(__name__)

BLOCKED_REASON = f"{BLOCK_PREFIX} audit: update blocked"
#: A refusal of this mod (after the policy prefix) starts so.
AUDIT_FAILED = "leakage audit failed:"
ON_FAILURE = ("refuse", "send")

DataFn = Callable[[Context], tuple[Any, Any]]


@dataclass(frozen=True)
class LeakageAuditConfig:
    """Settings of :func:`leakage_audit_mod`.

    Attributes:
        plan: what one audit does: batch size, the clients' local training (set it to
            the app's learning rate and steps), the protections in force, attacks,
            effort and time budget (default 10 s, effort 0.5).
        sampling: which (round, client) pairs audit (default 10 % of rounds, half of
            the clients in those).
        gate: block an update whose verdict is "leaks" (error reply).
        protections_from_config: read the protections the server announces in the
            train config and let them override ``plan.protections``: flwr-guard's
            ``DPFedAvg`` sends ``dp-clipping-norm`` (always) and ``dp-noise-multiplier``
            (distributed noise only — central noise is added by the server after it has
            seen the clipped update, so it does not count against a curious server).
        check_update_norm: warn when the reply's update is longer than the clipping
            norm in force (the clipping mod sits outside the audit). Turn it off when
            clipping is per example inside the optimiser (DP-SGD): the reply is then many
            steps, each bounded, not one update clipped to the norm.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        seed: seeds victims, noise and attacks together with the round and node id.
        on_failure: ``"refuse"`` (default: an update the audit could not check is not
            sent) or ``"send"`` (sent with ``audit-error = 1``); see the module doc.
        modality: ``"auto"``, ``"image"``, ``"vector"``, ``"tokens"``
            (:mod:`flwr_guard.audit.inputs`).
        input_key, target_key: keys of dict batches (default: the usual pairs,
            ``"x"``/``"y"``, ``"img"``/``"label"``, ...).
        max_samples: samples taken from an iterable ``data_fn`` (a DataLoader).

    Raises:
        ValueError: an unknown ``on_failure``.
    """

    plan: AuditPlan = field(default_factory=lambda: AuditPlan(effort=0.5, time_budget_s=10.0))
    sampling: AuditSampling = field(default_factory=AuditSampling)
    gate: bool = False
    protections_from_config: bool = True
    check_update_norm: bool = True
    device: str = "auto"
    seed: int = 0
    on_failure: str = "refuse"
    modality: str = "auto"
    input_key: str | None = None
    target_key: str | None = None
    max_samples: int | None = 2048

    def __post_init__(self) -> None:
        if self.on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure must be one of {ON_FAILURE}, got {self.on_failure!r}")

    def client_data(self, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, labels)`` from what ``data_fn`` returned."""
        return as_pair(data, self.input_key, self.target_key, self.max_samples)


def _loaded_model(msg: Message, model_fn: Callable[[], nn.Module]) -> nn.Module:
    arrays = first_array_record(msg.content)
    if arrays is None:
        raise ValueError("the train message carries no single ArrayRecord (global model)")
    model = model_fn()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_fn must return a torch nn.Module, got {type(model).__name__}")
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    return model


def preflight(msg: Message, context: Context, model_fn: Callable[[], nn.Module],
              data_fn: DataFn, config: LeakageAuditConfig) -> None:
    """Check that the audit can run on this app's model and data (see module doc).

    Raises:
        UnsupportedAuditInput, TypeError, RuntimeError, ValueError: naming the cause.
    """
    model = _loaded_model(msg, model_fn)
    data = prepare(*config.client_data(data_fn(context)), modality=config.modality)
    _check_model(model, data)


def protections_in_force(msg: Message, declared: Protections) -> Protections:
    """``declared``, with the clipping norm and (distributed) noise multiplier that the
    server announced in the train message's ConfigRecord, when present and valid."""
    clip, noise = declared.clipping_norm, declared.noise_multiplier
    for record in msg.content.config_records.values():
        value = record.get(TrainConfig.DP_CLIPPING_NORM)
        if isinstance(value, (int, float)) and value > 0:
            clip = float(value)
        value = record.get(TrainConfig.DP_NOISE_MULTIPLIER)
        if isinstance(value, (int, float)) and value >= 0:
            noise = float(value)
    if noise > 0 and clip is None:
        noise = 0.0
    return Protections(clip, noise, declared.aggregate_size)


def _measured_update_norm(msg: Message, reply: Message) -> float | None:
    sent, returned = first_array_record(msg.content), first_array_record(reply.content)
    if sent is None or returned is None:
        return None
    try:
        return update_norm(model_update({k: a.numpy() for k, a in returned.items()},
                                        {k: a.numpy() for k, a in sent.items()}))
    except ValueError:
        return None


def _audit(
    msg: Message, reply: Message, context: Context, model_fn: Callable[[], nn.Module],
    data_fn: DataFn, config: LeakageAuditConfig, rnd: int,
) -> AuditReport:
    model = _loaded_model(msg, model_fn)
    images, labels = config.client_data(data_fn(context))
    plan = config.plan
    if config.protections_from_config:
        plan = replace(plan, protections=protections_in_force(msg, plan.protections))
    clip = plan.protections.clipping_norm
    measured = _measured_update_norm(msg, reply) if config.check_update_norm else None
    if clip is not None and measured is not None and measured > clip * 1.001:
        logger.warning(
            "leakage audit: the reply's update norm is %.4g but the declared clipping "
            "norm is %g: clipping is not in force where the audit sits (check the mod "
            "order: the clipping mod must be inside the audit mod, see docs/audit.md)",
            measured, clip,
        )
    seed = derived_seed(config.seed, rnd, context.node_id)
    return run_audit(model, images, labels, plan, seed=seed, device=config.device,
                     modality=config.modality)


def leakage_audit_mod(
    model_fn: Callable[[], nn.Module],
    data_fn: DataFn,
    config: LeakageAuditConfig | None = None,
) -> Mod:
    """Build the leakage-audit mod for ``@app.train(mods=[...])``.

    Args:
        model_fn: returns the model architecture (weights are loaded from the train
            message's ArrayRecord with ``load_state_dict(strict=True)``). Its last
            ``nn.Linear`` must be the classifier.
        data_fn: ``data_fn(context)``: the client's own data as ``(inputs, labels)``,
            a dict batch or an iterable of batches; images in ``[0, 1]``, vectors of
            any range, token ids (:mod:`flwr_guard.audit.inputs`). Called on the first
            train message (the pre-flight check) and on audited rounds.
        config: sampling, plan, gate, device, seed.

    Returns:
        A Flower mod ``(msg, context, call_next) -> Message``. It leaves evaluate and
        query messages alone and never changes the reply's arrays.
    """
    config = config or LeakageAuditConfig()
    checked: list[bool] = []

    def failed(context: Context, what: str, err: Exception) -> str | None:
        """The refusal reason when the policy refuses, else ``None`` (logged either way)."""
        refuse = (config.on_failure == "refuse"
                  or context.node_config.get(NodeConfig.AUDIT_ON_FAILURE) == "refuse")
        text = f"{AUDIT_FAILED} {what}: {type(err).__name__}: {err}"
        if refuse:
            return text + " (the update is not sent: fix the audit's model_fn/data_fn, or "\
                "set LeakageAuditConfig(on_failure='send'))"
        logger.error("%s; reply sent unaudited (on_failure='send')", text)
        return None

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if message_kind(msg) != "train" or not msg.content.array_records:
            return call_next(msg, context)
        if not checked:
            try:
                preflight(msg, context, model_fn, data_fn, config)
                checked.append(True)
            except Exception as err:  # any failure: the audit cannot run on this app
                why = failed(context, "the audit cannot run on this app", err)
                if why is not None:
                    return refusal(msg, why)
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        rnd = server_round(msg)
        metrics = neutral_metrics()
        report = None
        if checked and config.sampling.sampled(rnd, context.node_id):
            try:
                report = _audit(msg, reply, context, model_fn, data_fn, config, rnd)
                metrics = report.to_metrics()
                logger.info("leakage audit round %d: %s", rnd, report.verdict[1])
            except Exception as err:  # an audit that fails is never silent
                reason = failed(context, f"round {rnd}", err)
                if reason is not None:
                    return refusal(msg, reason)
                metrics[ReplyMetrics.AUDIT_ERROR] = 1
        elif not checked:
            metrics[ReplyMetrics.AUDIT_ERROR] = 1
        if report is not None and config.gate and report.leaks:
            reason = f"{BLOCKED_REASON} (round {rnd}): {report.verdict[1]}"
            if math.isfinite(report.psnr_gain_db):  # not for text
                reason += (f"; worst-case PSNR {report.worst.mean_psnr_db:.1f} dB, "
                           f"{report.psnr_gain_db:+.1f} dB vs the mean image")
            logger.warning(reason)
            error = Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason)
            return Message(error, reply_to=msg)
        try:
            record = reply_metric_record(reply)
        except ValueError as err:
            logger.error("leakage audit: %s; scores not attached", err)
            return reply
        clashes = [k for k in metrics if k in record]
        if clashes:
            logger.warning("leakage audit: reply already has %s; overwriting", clashes)
        for key, value in metrics.items():
            record[key] = value
        return reply

    return mod

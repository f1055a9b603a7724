"""ClientApp of the reference app: local SGD on this node's digits partition.

Node config (``flower-supernode --node-config``; filled in by the simulation engine):
``partition-id``, ``num-partitions`` and optionally ``device`` ("cpu" by default,
"cuda" to train on the GPU when there is one); under DP-SGD also the node's own
record-level policy and ledger (``dp-sgd-ledger``, ``dp-sgd-max-epsilon``, ... see
docs/privacy.md).
"""

from __future__ import annotations

from collections.abc import Sized
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwr_guard.apps.digits.data import node_partition_arrays, to_tensor_dataset
from flwr_guard.apps.digits.leakage_audit import digits_audit_mod
from flwr_guard.guard import ClientGuard, ClientPolicy
from flwr_guard.keys import ReplyMetrics, RunConfig

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from flwr_guard.apps.digits.model import DigitsCNN

# torch, the model and the training loops are imported inside the handlers: a deployed
# ClientApp process lives for one message, and the SecAgg+ stages other than the
# masked input (4 of 5 messages per round) never train; importing torch costs ~2 s.

app = ClientApp()

# Share of a node's partition kept aside for the node's own evaluation.
LOCAL_VALIDATION_FRACTION = 0.1


def _local_data(context: Context) -> tuple[DataLoader, DataLoader]:
    from torch.utils.data import DataLoader

    cfg = context.run_config
    seed = int(cfg["seed"])
    images, labels = node_partition_arrays(cfg, context.node_config)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_val = max(1, int(len(labels) * LOCAL_VALIDATION_FRACTION))
    val_idx, train_idx = order[:n_val], order[n_val:]
    train = DataLoader(
        to_tensor_dataset(images[train_idx], labels[train_idx]),
        batch_size=int(cfg["batch-size"]),
        shuffle=True,
    )
    val = DataLoader(to_tensor_dataset(images[val_idx], labels[val_idx]), batch_size=256)
    return train, val


def _num_examples(loader: DataLoader) -> int:
    """Number of records behind ``loader`` (a map-style dataset: it has a length)."""
    return len(cast(Sized, loader.dataset))


def _model(msg: Message) -> DigitsCNN:
    from flwr_guard.apps.digits.model import DigitsCNN

    model = DigitsCNN()
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    return model


# ClientGuard builds the mods in the one valid order: on the way out a reply goes train ->
# update clipping (when the server asks) -> leakage audit -> reply inspection -> SecAgg+
# -> policy check. See docs/quickstart.md and docs/audit.md.
# The app requires nothing of its own; the node operator's node config adds what the node
# requires (`guard-require-secagg`, ... : flwr_guard.guard.policy), and the demo's
# SuperNodes require SecAgg+. The audit is configured per message from the run config.
guard = ClientGuard(ClientPolicy(), audit=digits_audit_mod)


@app.train(mods=guard.train_mods())
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on the local partition; reply with the weights."""
    from flwr_guard.apps.digits.training import select_device, train_dpsgd_epochs, train_epochs

    cfg = context.run_config
    model = _model(msg)
    trainloader, _ = _local_data(context)
    device = select_device(str(context.node_config.get("device", "cpu")))
    common: dict[str, Any] = dict(
        epochs=int(cfg["local-epochs"]),
        learning_rate=float(cfg["learning-rate"]),
        momentum=float(cfg["momentum"]),
        device=device,
    )
    metrics: dict[str, int | float | list[int] | list[float]] = {
        "num-examples": _num_examples(trainloader)
    }
    from flwr_guard.robust.objectives import RobustObjective, check_dpsgd_compatible

    robust = RobustObjective.from_run_config(cfg)  # robust-objective "plain" = off
    check_dpsgd_compatible(robust, bool(cfg[RunConfig.DP_SGD]))  # refused, naming the fix
    if robust.enabled:
        # CURE / SCORPIO-style / PGD-AT (flwr_guard.robust, docs/robustness.md)
        from flwr_guard.robust.objectives import train_robust_epochs

        cost = train_robust_epochs(model, trainloader, robust, **common)
        metrics["train-loss"] = cost.loss
        metrics[ReplyMetrics.ROBUST_TRAIN_SECONDS_PER_STEP] = cost.seconds_per_step
    elif bool(cfg[RunConfig.DP_SGD]):
        # Record-level DP: the library checks dp-sgd-max-epsilon (capped by the node
        # config's) before training and keeps the ledger on the node's disk.
        from flwr_guard.dp.context_state import dpsgd_from_context, save_dpsgd

        dpsgd = dpsgd_from_context(context, epochs=int(cfg["local-epochs"]))
        metrics["train-loss"] = train_dpsgd_epochs(model, trainloader, dpsgd=dpsgd, **common)
        metrics[ReplyMetrics.DP_SGD_EPSILON] = save_dpsgd(context, dpsgd)
    else:
        metrics["train-loss"] = train_epochs(model, trainloader, **common)
    content = RecordDict(
        {"arrays": ArrayRecord(model.cpu().state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the node's local validation split."""
    from flwr_guard.apps.digits.training import evaluate, select_device

    model = _model(msg)
    _, valloader = _local_data(context)
    device = select_device(str(context.node_config.get("device", "cpu")))
    loss, accuracy = evaluate(model, valloader, device)
    metrics = MetricRecord(
        {"eval-loss": loss, "eval-acc": accuracy, "num-examples": _num_examples(valloader)}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

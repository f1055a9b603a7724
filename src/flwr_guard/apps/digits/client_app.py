"""ClientApp of the reference app: local SGD on this node's digits partition.

Node config (``flower-supernode --node-config``; filled in by the simulation engine):
``partition-id``, ``num-partitions`` and optionally ``device`` ("cpu" by default,
"cuda" to train on the GPU when there is one).
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import DataLoader

from flwr_guard.apps.digits.data import cached_partition_arrays, to_tensor_dataset
from flwr_guard.apps.digits.model import DigitsCNN
from flwr_guard.apps.digits.training import evaluate, select_device, train_epochs
from flwr_guard.secagg.mod import secaggplus_mod

app = ClientApp()

# Share of a node's partition kept aside for the node's own evaluation.
LOCAL_VALIDATION_FRACTION = 0.1


def _local_data(context: Context) -> tuple[DataLoader, DataLoader]:
    cfg = context.run_config
    seed = int(cfg["seed"])
    images, labels = cached_partition_arrays(
        partition_id=int(context.node_config["partition-id"]),
        num_partitions=int(context.node_config["num-partitions"]),
        kind=str(cfg["partitioner"]),  # type: ignore[arg-type]
        alpha=float(cfg["dirichlet-alpha"]),
        seed=seed,
        test_fraction=float(cfg["test-fraction"]),
    )
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


def _model(msg: Message) -> DigitsCNN:
    model = DigitsCNN()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


# The SecAgg+ mod masks the update on its way out; it passes through messages that
# the server did not send with SecAgg+ (run config `secagg = false`).
@app.train(mods=[secaggplus_mod])
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on the local partition; reply with the weights."""
    cfg = context.run_config
    model = _model(msg)
    trainloader, _ = _local_data(context)
    device = select_device(str(context.node_config.get("device", "cpu")))
    train_loss = train_epochs(
        model,
        trainloader,
        epochs=int(cfg["local-epochs"]),
        learning_rate=float(cfg["learning-rate"]),
        momentum=float(cfg["momentum"]),
        device=device,
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.cpu().state_dict()),
            "metrics": MetricRecord(
                {"train-loss": train_loss, "num-examples": len(trainloader.dataset)}
            ),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the node's local validation split."""
    model = _model(msg)
    _, valloader = _local_data(context)
    device = select_device(str(context.node_config.get("device", "cpu")))
    loss, accuracy = evaluate(model, valloader, device)
    metrics = MetricRecord(
        {"eval-loss": loss, "eval-acc": accuracy, "num-examples": len(valloader.dataset)}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

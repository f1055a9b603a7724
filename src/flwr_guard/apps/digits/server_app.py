"""ServerApp of the reference app: FedAvg with server-side evaluation each round.

Run config: see ``[tool.flwr.app.config]`` in this folder's ``pyproject.toml``.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch.utils.data import DataLoader

from flwr_guard.apps.digits.data import load_test_set, to_tensor_dataset
from flwr_guard.apps.digits.model import DigitsCNN
from flwr_guard.apps.digits.progress import ProgressRecorder
from flwr_guard.apps.digits.training import evaluate

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds of FedAvg and evaluate on the held-out set."""
    cfg = context.run_config
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    model = DigitsCNN()
    test = load_test_set(float(cfg["test-fraction"]), seed)
    testloader = DataLoader(to_tensor_dataset(test["image"], test["label"]), batch_size=512)
    min_nodes = int(cfg["min-nodes"])
    strategy = FedAvg(
        fraction_train=float(cfg["fraction-train"]),
        fraction_evaluate=float(cfg["fraction-evaluate"]),
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes,
        min_available_nodes=min_nodes,
    )
    recorder = ProgressRecorder(strategy, path=str(cfg["progress-file"]))

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, testloader, torch.device("cpu"))
        metrics = MetricRecord({"test-loss": loss, "test-accuracy": accuracy})
        recorder.record_round(server_round, metrics)
        return metrics

    result = recorder.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(cfg["num-server-rounds"]),
        evaluate_fn=evaluate_global,
    )
    recorder.finish(result)

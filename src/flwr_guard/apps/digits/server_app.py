"""ServerApp of the reference app: FedAvg with server-side evaluation each round.

The protections are declared once, with :class:`flwr_guard.GuardedStrategy` (telemetry,
the leakage-audit summary, SecAgg+ when the run config's ``secagg`` is on, the reply
guard, around FedAvg; docs/quickstart.md); a :class:`ProgressRecorder` observes each
round for ``flwr-guard demo``.

Run config: see ``[tool.flwr.app.config]`` in this folder's ``pyproject.toml``.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch.utils.data import DataLoader

from flwr_guard.apps.digits.data import held_out_arrays, to_tensor_dataset
from flwr_guard.apps.digits.model import DigitsCNN
from flwr_guard.apps.digits.progress import ProgressRecorder
from flwr_guard.apps.digits.training import evaluate
from flwr_guard.guard import GuardedStrategy, SecAgg
from flwr_guard.keys import RunConfig
from flwr_guard.robust.server_eval import RobustnessEvaluator

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds of FedAvg and evaluate on the held-out set."""
    cfg = context.run_config
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    model = DigitsCNN()
    test_images, test_labels = held_out_arrays(float(cfg["test-fraction"]), seed)
    testloader = DataLoader(to_tensor_dataset(test_images, test_labels), batch_size=512)
    min_nodes = int(cfg["min-nodes"])
    fedavg = FedAvg(
        fraction_train=float(cfg["fraction-train"]),
        fraction_evaluate=float(cfg["fraction-evaluate"]),
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes,
        min_available_nodes=min_nodes,
    )
    secagg = SecAgg.from_run_config(cfg)
    budget = {
        RunConfig.DP_SGD: bool(cfg[RunConfig.DP_SGD]),
        RunConfig.DP_SGD_MAX_EPSILON: float(cfg[RunConfig.DP_SGD_MAX_EPSILON]),
        RunConfig.DP_SGD_DELTA: float(cfg[RunConfig.DP_SGD_DELTA]),
    }

    def extras(server_round: int) -> dict:
        history = strategy.secagg.history if strategy.secagg is not None else []
        reports = [r for r in history if r.server_round == server_round]
        return {"privacy": budget, **({"secagg": reports[-1].to_dict()} if reports else {})}

    recorder = ProgressRecorder(fedavg, path=str(cfg["progress-file"]), extras=extras)
    strategy = GuardedStrategy(fedavg, secagg=secagg, telemetry=context, observer=recorder)

    # Robustness evaluation every robust-eval-every rounds (flwr_guard.robust, docs/robustness.md)
    robustness = RobustnessEvaluator.from_run_config(cfg)
    test_x = torch.as_tensor(test_images, dtype=torch.float32)
    test_y = torch.as_tensor(test_labels, dtype=torch.long)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, testloader, torch.device("cpu"))
        robust = robustness(server_round, model, test_x, test_y)
        metrics = MetricRecord({"test-loss": loss, "test-accuracy": accuracy, **robust})
        recorder.record_round(server_round, metrics)
        return metrics

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(cfg["num-server-rounds"]),
        evaluate_fn=evaluate_global,
    )
    recorder.finish(result, audit=strategy.audit.worst() if strategy.audit else None)

"""docs/quickstart.md: 'dp.fit(device) ... (tuple or dict batches; empty Poisson
batches take their noisy step too)'. Small loaders make empty Poisson batches frequent."""
import numpy as np
import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from guard_attack_helpers import SHAPE, arrays, fedavg, initial
from guard_harness import LoopbackGrid

from flwr_guard.guard.client import ClientGuard
from flwr_guard.guard.strategy import GuardedStrategy

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from flwr_guard.dp.dpsgd import DPSGDConfig  # noqa: E402


@pytest.mark.parametrize("kind", ["dict", "tuple"])
def test_fit_with_frequent_empty_batches(kind):
    torch.manual_seed(0)
    guard = ClientGuard(dpsgd=DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    xs, ys = torch.randn(4, SHAPE[1]), torch.randint(0, SHAPE[0], (4,))
    data = ([{"img": xs[i], "label": int(ys[i])} for i in range(4)] if kind == "dict"
            else TensorDataset(xs, ys))

    def train(msg: Message, context: Context) -> Message:
        model = torch.nn.Linear(SHAPE[1], SHAPE[0], bias=False)
        model.weight.data = torch.tensor(msg.content["arrays"]["w"].numpy())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        keys = {"input_key": "img", "target_key": "label"} if kind == "dict" else {}
        with guard.private_training(context, model, opt, DataLoader(data, batch_size=1), epochs=5,
                                    **keys) as dp:
            dp.fit()
        w = model.weight.detach().numpy().astype(np.float32)
        assert np.isfinite(w).all()
        return Message(RecordDict({"arrays": arrays(w), "metrics": MetricRecord({"num-examples": 4})}),
                       reply_to=msg)

    a = ClientApp()
    a.train(mods=guard.train_mods())(train)
    grid = LoopbackGrid({1: a, 2: a}, node_config={n: {"dp-sgd-max-epsilon": 20.0} for n in (1, 2)})
    GuardedStrategy(fedavg(2)).start(grid, initial(), num_rounds=2)
    errors = [r.error.reason for r in grid.received if r.has_error()]
    assert not errors, errors

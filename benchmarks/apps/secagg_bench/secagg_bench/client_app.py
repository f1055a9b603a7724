"""ClientApps of the three variants behind one manifest entry.

- ``fedavg``: Message API, ``@app.train(mods=[timing_mod, drop_mod])``;
- ``guard``: Message API, ``@app.train(mods=[timing_mod, drop_mod, secaggplus_mod])``
  with flwr-guard's mod;
- ``guard-dp``: Message API, ``@app.train(mods=[timing_mod, drop_mod,
  *ClientGuard(ClientPolicy(secagg=True, dp="distributed")).train_mods()])``: the policy
  mod, SecAgg+ (which adds the client's Skellam noise), reply inspection, update clipping;
- ``flower``: legacy ``ClientApp(client_fn=..., mods=[timing_mod, drop_mod,
  flwr.client.mod.secaggplus_mod])`` around a ``NumPyClient`` (Flower's SecAgg+ mod
  works only on the legacy fit path).

Every client returns ``global + client_update(node_id, round)`` and
``num-examples = num_examples(node_id)`` (see :mod:`secagg_bench.task`).
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod as flower_secaggplus_mod
from flwr.clientapp import ClientApp

from flwr_guard.guard import ClientGuard, ClientPolicy
from flwr_guard.secagg.mod import secaggplus_mod
from secagg_bench.measure import drop_mod, timing_mod
from secagg_bench.task import client_update, num_examples


def _train(msg: Message, context: Context) -> Message:
    (weights,) = msg.content["arrays"].to_numpy_ndarrays()
    server_round = int(msg.content["config"]["server-round"])
    dimension = int(context.run_config["dimension"])
    local = weights + client_update(context.node_id, server_round, dimension)
    content = RecordDict(
        {
            "arrays": ArrayRecord(numpy_ndarrays=[local]),
            "metrics": MetricRecord({"num-examples": num_examples(context.node_id)}),
        }
    )
    return Message(content=content, reply_to=msg)


fedavg_app = ClientApp()
fedavg_app.train(mods=[timing_mod, drop_mod])(_train)

guard_app = ClientApp()
guard_app.train(mods=[timing_mod, drop_mod, secaggplus_mod])(_train)

# The client's own policy: SecAgg+ required, distributed DP required (a server that asks
# for no noise, or for more contributors than the cohort, is refused).
_DP_GUARD = ClientGuard(ClientPolicy(secagg=True, dp="distributed"))
guard_dp_app = ClientApp()
guard_dp_app.train(mods=[timing_mod, drop_mod, *_DP_GUARD.train_mods()])(_train)


class _LegacyClient(NumPyClient):
    def __init__(self, node_id: int, dimension: int) -> None:
        self.node_id, self.dimension = node_id, dimension

    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        (weights,) = parameters
        update = client_update(self.node_id, int(config["server-round"]), self.dimension)
        return [np.asarray(weights) + update], num_examples(self.node_id), {}


def _client_fn(context: Context):  # type: ignore[no-untyped-def]
    return _LegacyClient(context.node_id, int(context.run_config["dimension"])).to_client()


flower_app = ClientApp(
    client_fn=_client_fn, mods=[timing_mod, drop_mod, flower_secaggplus_mod]
)

APPS = {"fedavg": fedavg_app, "guard": guard_app, "guard-dp": guard_dp_app, "flower": flower_app}


class _VariantClientApp(ClientApp):
    """One manifest entry for four ClientApps: the run config's ``variant`` picks. The
    ServerApp's warm-up query (before round 1, to start Ray's actors) gets an empty reply."""

    def __call__(self, message: Message, context: Context) -> Message:
        if message.metadata.message_type == MessageType.QUERY:
            return Message(RecordDict(), reply_to=message)
        return APPS[str(context.run_config["variant"])](message, context)


app = _VariantClientApp()

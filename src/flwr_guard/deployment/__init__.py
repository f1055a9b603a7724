"""Run Flower deployments for flwr-guard: a real local SuperLink and SuperNodes.

``topology`` describes the processes and their command lines, ``processes``
supervises them (and every process they spawn), ``local`` starts a deployment on
127.0.0.1 and submits runs to it with the ``flwr`` CLI.
"""

from flwr_guard.deployment.local import DeploymentError, LocalDeployment, RunFailed
from flwr_guard.deployment.ports import PortInUseError, ensure_port_free, free_port
from flwr_guard.deployment.topology import Topology

__all__ = [
    "DeploymentError",
    "LocalDeployment",
    "PortInUseError",
    "RunFailed",
    "Topology",
    "ensure_port_free",
    "free_port",
]

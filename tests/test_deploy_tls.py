"""TLS + SuperNode authentication as real local processes on 127.0.0.1.

The SuperLink serves HTTPS with a certificate from :mod:`flwr_guard.deployment.tls`,
requires SuperNode authentication; two registered SuperNodes train the digits app with
SecAgg+ (1 round) while a third SuperNode, whose key was never registered, is refused.
The users' certificate script (deploy/compose/certs/generate.sh) makes credentials that
admit a SuperNode the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import alive
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from flwr_guard.apps.digits import app_dir
from flwr_guard.deployment import DeploymentError, LocalDeployment, Topology, free_port
from flwr_guard.deployment.healthcheck import superlink_healthy
from flwr_guard.deployment.processes import ProcessSupervisor
from flwr_guard.deployment.provision import provision
from flwr_guard.deployment.tls import LOCAL_HOSTS, make_credentials
from flwr_guard.deployment.topology import TlsConfig

pytestmark = pytest.mark.deployment

COMPLETED = "finished:completed"


def test_tls_and_supernode_auth_run_completes_and_unregistered_node_is_refused(
    tmp_path,
) -> None:
    # Every credential from `flwr-guard provision` (TLS, SuperNode keys, SecAgg+ keys and
    # the administrator-signed roster, whose signature each node checks): the nodes
    # refuse SecAgg+ rounds without a roster (docs/secagg.md).
    fed = provision(tmp_path / "credentials", 3, hosts=LOCAL_HOSTS)
    tls = TlsConfig(str(fed.out / "ca.crt"), str(fed.out / "server.crt"), str(fed.out / "server.key"))
    keys = tuple(str(fed.auth_key(i)) for i in range(3))
    # A cohort of 2 of a roster of 3: C = 0 and h = 1 (sums of 2), set by the operator,
    # who also creates each node's record-level ledger (`flwr-guard ledger init`).
    from flwr_guard.dp.node_policy import data_source
    from flwr_guard.dp.record_ledger import init_ledger

    ledgers = tmp_path / "dp-sgd-ledger"
    federation = [{**fed.node_config(i), "secagg-min-cohort": 2, "secagg-max-colluders": 0,
                   "secagg-min-honest-others": 1, "dp-sgd-ledger": str(ledgers)} for i in range(2)]
    for i in range(2):
        init_ledger(str(ledgers), data_source({"partition-id": i}))
    topo = Topology.on_free_ports(nodes=2, tls=tls, supernode_auth_keys=keys[:2],
                                  per_node_config=tuple(federation))
    assert "--insecure" not in topo.superlink_command() + topo.supernode_command(0)
    # The same deployment seen with a third SuperNode whose key is never registered.
    with_intruder = dataclasses.replace(
        topo,
        nodes=3,
        supernode_ports=(*topo.supernode_ports, free_port()),
        supernode_auth_keys=keys,
    )
    progress = tmp_path / "progress.jsonl"
    deployment = LocalDeployment(topo, tmp_path / "work")
    with deployment:
        assert superlink_healthy(topo.health_url, tls.ca_certfile)
        # Without our CA the certificate is not trusted; plain HTTP gets no answer.
        assert not superlink_healthy(topo.health_url)
        assert not superlink_healthy(topo.health_url.replace("https://", "http://"))

        run_id = deployment.submit(
            app_dir(),
            {
                "num-server-rounds": 1,
                "min-nodes": 2,
                "fraction-evaluate": 0.0,
                "secagg": True,  # a protected run: the server sees the masked sum only
                "audit": False,  # what this test is about is the transport
                "metrics": False,
                "progress-file": str(progress),
            },
        )

        intruders = ProcessSupervisor(tmp_path / "intruder-logs")
        try:
            intruder = intruders.start(
                "intruder", with_intruder.supernode_command(2), deployment.env
            )
            exit_code = intruder.popen.wait(timeout=180)
            log = intruder.log_path.read_text(errors="replace")
        finally:
            assert intruders.stop_all() == []
        # Flower's SUPERNODE_CONNECTION_ERROR (305) in the log, with the SuperLink's reason
        # after it; the process itself exits 1 in Flower 1.41 (uvicorn's shutdown)
        assert exit_code != 0
        assert "Exit Code: 305" in log, log[-2000:]
        assert "Failed to initialize the connection to the SuperLink" in log, log[-2000:]
        assert "Failed to activate SuperNode" in log, log[-2000:]

        status, deadline = "", time.monotonic() + 480
        while not status.startswith("finished:") and time.monotonic() < deadline:
            deployment.check_alive()
            status = str(deployment.run_info(run_id).get("status"))
            time.sleep(3)
        assert status == COMPLETED, deployment.run_info(run_id)

        listed = deployment.flwr("supernode", "ls", "flwr-guard", "--format", "json")
        nodes = json.loads(listed.stdout)["nodes"]
        assert len(nodes) == 2, nodes  # the intruder never became a node
    rounds = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]
    trained = [r for r in rounds if r.get("event") == "round" and r["round"] == 1]
    assert trained and trained[0]["train-replies"] == 2
    secagg = trained[0]["secagg"]
    assert (secagg["cohort"], secagg["survivors"], secagg["aborted"]) == (2, 2, None)
    assert alive(
        [{"pid": r.pid, "create_time": r.create_time} for r in deployment.processes_seen()]
    ) == []


def test_generated_server_certificate_names_loopback_and_is_signed_by_the_ca(tmp_path) -> None:
    tls, keys = make_credentials(tmp_path, nodes=1, hosts=["superlink", "10.0.0.7"])
    cert = x509.load_pem_x509_certificate(open(tls.certfile, "rb").read())
    ca = x509.load_pem_x509_certificate(open(tls.ca_certfile, "rb").read())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["superlink"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600
    assert open(keys[0]).read().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert open(f"{keys[0]}.pub").read().startswith("ecdsa-sha2-nistp384 ")
    with pytest.raises(ValueError, match="needs TLS"):
        Topology.on_free_ports(nodes=1, supernode_auth_keys=keys)


GENERATE = Path(__file__).resolve().parents[1] / "deploy" / "compose" / "certs" / "generate.sh"


def _generate(out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(GENERATE), str(out)],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.skipif(
    shutil.which("openssl") is None or shutil.which("ssh-keygen") is None,
    reason="generate.sh needs openssl and ssh-keygen (openssh-client)",
)
def test_certificate_script_credentials_admit_a_supernode_over_tls(tmp_path) -> None:
    """The users' script (openssl, ssh-keygen) makes material Flower accepts."""
    out = tmp_path / "credentials"
    done = _generate(out, NODES="2", SUPERLINK_HOSTS="fl.example.com 203.0.113.7")
    assert done.returncode == 0, done.stderr
    cert = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate((out / "ca.crt").read_bytes()))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["superlink", "localhost", "fl.example.com"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1",
        "::1",
        "203.0.113.7",
    ]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    assert out.stat().st_mode & 0o777 == 0o700
    assert (out / "ca.key").stat().st_mode & 0o777 == 0o600
    key = load_ssh_private_key((out / "supernode-1").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    again = _generate(out)
    assert again.returncode == 1 and "FORCE=1" in again.stderr
    assert _generate(tmp_path / "x", NODES="zero").returncode == 2

    tls = TlsConfig(str(out / "ca.crt"), str(out / "server.crt"), str(out / "server.key"))
    topo = Topology.on_free_ports(
        nodes=1, tls=tls, supernode_auth_keys=(str(out / "supernode-0"),)
    )
    with LocalDeployment(topo, tmp_path / "work") as deployment:
        deadline, nodes = time.monotonic() + 120, []
        while time.monotonic() < deadline:
            deployment.check_alive()
            listed = deployment.flwr("supernode", "ls", "flwr-guard", "--format", "json")
            nodes = json.loads(listed.stdout)["nodes"]
            if nodes and nodes[0]["status"] == "online":
                break
            time.sleep(2)
        assert [n["status"] for n in nodes] == ["online"]
        with pytest.raises(DeploymentError, match="Public key already in use"):
            deployment.register_supernode(out / "supernode-0.pub")
        # The compose / Kubernetes registration step: idempotent, registers new keys.
        step = subprocess.run(
            [
                sys.executable,
                "-m",
                "flwr_guard.deployment.register",
                "--connection",
                "flwr-guard",
                str(out / "supernode-0.pub"),
                str(out / "supernode-1.pub"),
            ],
            env=deployment.env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert step.returncode == 0, step.stderr
        assert "supernode-0.pub: already registered" in step.stdout
        assert re.search(r"supernode-1\.pub: registered as node \d+", step.stdout)

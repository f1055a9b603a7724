"""The Helm chart (deploy/k8s/flwr-guard): lint, render, validate, compare with Topology.

Rendering is Helm's own engine (helm-python-sdk binds Helm's Go SDK); the manifests are
validated with `kubernetes-validate --strict` against Kubernetes 1.28 (the chart's
minimum) and the newest schema it ships; the Prometheus configuration it renders goes
through `promtool check config`.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import helm_python as helm
import pytest
import yaml
from conftest import REPO
from flwr.common.config import parse_config_args

from flwr_guard.deployment.fab_allowlist import IMAGE_ALLOWLIST
from flwr_guard.deployment.manifests import (
    CONTAINER_NODE_POLICY,
    GUARD_ENTRYPOINT,
    K8S_CONNECTION,
    LEDGER_DIR,
    POD_INDEX,
    SECAGG_DIR,
    check_command_line,
    compose_topology,
    container_topology,
    k8s_drift,
)
from flwr_guard.deployment.provision import provision
from flwr_guard.secagg.keys import load_signing_key
from flwr_guard.secagg.policy import policy_from_node_config

CHART = REPO / "deploy" / "k8s" / "flwr-guard"
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
RELEASE, NAMESPACE = "demo", "fl"
SECRETS = {
    "tls": {"existingSecret": "fl-tls"},
    "supernodeAuth": {"existingSecret": "fl-keys"},
    "secagg": {"existingSecret": "fl-secagg"},
}
ADMIN_KEY = "ab" * 32

helm.disable_logging()


def _render(values: dict, chart: Path = CHART) -> list[dict]:
    rendered = helm.Chart.load(chart).render(
        values, name=RELEASE, namespace=NAMESPACE, is_install=True
    )
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


def _validate(manifests: list[dict], tmp_path: Path) -> None:
    path = tmp_path / "manifests.yaml"
    path.write_text(yaml.safe_dump_all(manifests))
    for version in ("1.28.0", None):
        args = [str(VALIDATE), "--strict", "--quiet"]
        if version:
            args += ["-k", version]
        done = subprocess.run(
            [*args, str(path)], capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr


def _configmap(manifests: list[dict], name: str) -> dict:
    (found,) = [m for m in manifests if m["kind"] == "ConfigMap" and m["metadata"]["name"] == name]
    return found


CASES = {
    "insecure": (
        {"tls": {"enabled": False}, "supernodeAuth": {"enabled": False}, "secagg": {"existingSecret": "s"}},
        dict(nodes=3, secure=False),
    ),
    "secagg-roster-signature-checked": (
        {**SECRETS, "secagg": {"existingSecret": "s", "rosterAdminKey": ADMIN_KEY}},
        dict(nodes=3, secure=True, roster_admin_key=ADMIN_KEY),
    ),
    "no-secagg-credentials": (
        {**SECRETS, "secagg": {"enabled": False}},
        dict(nodes=3, secure=True, secagg=False),
    ),
    "tls-auth-existing-secrets": (SECRETS, dict(nodes=3, secure=True)),
    "gpu-5-nodes": (
        {
            **SECRETS,
            "supernodes": {"replicas": 5, "gpu": {"enabled": True, "count": 2}},
            "metrics": {"pushgatewayUrl": "http://pushgateway.monitoring:9091"},
        },
        dict(nodes=5, secure=True, node_config={"device": "cuda"}),
    ),
    "extra-node-config": (
        {**SECRETS, "supernodes": {"nodeConfig": {"batch": 16, "site": "lab-a"}}},
        dict(nodes=3, secure=True, node_config={"batch": 16, "site": "lab-a"}),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rendered_chart_is_valid_and_runs_the_topology(case: str, tmp_path) -> None:
    values, topo_args = CASES[case]
    manifests = _render(values)
    _validate(manifests, tmp_path)
    topology = container_topology(superlink_host=f"{RELEASE}-superlink", **topo_args)
    assert k8s_drift(manifests, topology) == []
    (statefulset,) = [m for m in manifests if m["kind"] == "StatefulSet"]
    pod = statefulset["spec"]["template"]["spec"]
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        argv = [*container["command"], *container["args"]]
        for index in range(topology.nodes):
            check_command_line([a.replace(POD_INDEX, str(index)) for a in argv])
        env = {e["name"]: e for e in container["env"]}
        if any(POD_INDEX in a for a in argv):
            assert env["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
                "metadata.labels['apps.kubernetes.io/pod-index']"
            )
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        for probe in ("livenessProbe", "readinessProbe"):
            if "exec" in container.get(probe, {}):
                check_command_line(container[probe]["exec"]["command"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    (deployment,) = [m for m in manifests if m["kind"] == "Deployment"]
    (superlink,) = deployment["spec"]["template"]["spec"]["containers"]
    check_command_line([*superlink["command"], *superlink["args"]])
    scheme = superlink["readinessProbe"]["httpGet"]["scheme"]
    assert scheme == ("HTTPS" if topology.tls else "HTTP")
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits.get("nvidia.com/gpu") == (2 if case == "gpu-5-nodes" else None)
    if topology.supernode_auth:
        config = _configmap(manifests, f"{RELEASE}-flwr-config")["data"]["config.toml"]
        assert tomllib.loads(config) == tomllib.loads(topology.flwr_config_toml(K8S_CONNECTION))


def test_secrets_from_files_carry_the_provisioned_credentials(tmp_path) -> None:
    """`flwr-guard provision` output, passed with --set-file, becomes the three Secrets;
    pod i mounts the SecAgg+ secret and reads its own key by index."""
    fed = provision(tmp_path / "credentials", 3, hosts=[f"{RELEASE}-superlink", "127.0.0.1"])
    out = fed.out
    values = {
        "tls": {
            "ca": (out / "ca.crt").read_text(),
            "cert": (out / "server.crt").read_text(),
            "key": (out / "server.key").read_text(),
        },
        "supernodeAuth": {
            "privateKeys": [fed.auth_key(i).read_text() for i in range(3)],
            "publicKeys": [(out / f"supernode-{i}.pub").read_text() for i in range(3)],
        },
        "secagg": {
            "signingKeys": [fed.signing_key(i).read_text() for i in range(3)],
            "roster": fed.roster.read_text(),
            "rosterAdminKey": fed.admin_public_key.hex(),
        },
    }
    manifests = _render(values)
    _validate(manifests, tmp_path)
    secrets = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "Secret"}
    data = secrets[f"{RELEASE}-tls"]["data"]
    assert base64.b64decode(data["server.crt"]).decode() == (out / "server.crt").read_text()
    data = secrets[f"{RELEASE}-supernode-keys"]["data"]
    assert sorted(data) == sorted([f"supernode-{i}" for i in range(3)] + [
        f"supernode-{i}.pub" for i in range(3)
    ])
    assert base64.b64decode(data["supernode-2"]).decode() == fed.auth_key(2).read_text()
    data = secrets[f"{RELEASE}-secagg"]["data"]
    assert sorted(data) == ["roster.json", "secagg-0.key", "secagg-1.key", "secagg-2.key"]
    # what a pod reads from the mounted Secret is what each node's policy loads and checks
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    for name, value in data.items():
        (mounted / name).write_bytes(base64.b64decode(value))
    (statefulset,) = [m for m in manifests if m["kind"] == "StatefulSet"]
    pod = statefulset["spec"]["template"]["spec"]
    (node,) = [c for c in pod["containers"] if c["name"] == "supernode"]
    assert {"name": "secagg", "mountPath": SECAGG_DIR, "readOnly": True} in node["volumeMounts"]
    node_config = node["args"][node["args"].index("--node-config") + 1]
    for index in range(3):
        config = parse_config_args([node_config.replace(POD_INDEX, str(index))])
        config = {k: str(v).replace(SECAGG_DIR, str(mounted)) for k, v in config.items()}
        policy = policy_from_node_config(config)
        own = load_signing_key(mounted / f"secagg-{index}.key")
        assert own == load_signing_key(fed.signing_key(index))
        assert policy.roster is not None and len(policy.roster.members) == 3


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "set tls.existingSecret, or tls.ca, tls.cert and tls.key"),
        (
            {"tls": {"enabled": False}, "supernodeAuth": {"existingSecret": "k"}},
            "needs tls.enabled",
        ),
        (
            {"tls": {"existingSecret": "t"}, "supernodeAuth": {"privateKeys": ["a"]}},
            "set existingSecret, or 3 privateKeys and 3 publicKeys",
        ),
        (
            {"tls": {"existingSecret": "t"}, "supernodeAuth": {"existingSecret": "k"},
             "secagg": {"signingKeys": ["a", "b", "c"]}},
            "secagg: set existingSecret, or 3 signingKeys and roster",
        ),
    ],
)
def test_incomplete_security_values_are_refused(values: dict, message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        _render(values)


def test_helm_lint_strict_has_no_warnings() -> None:
    report = helm.lint(CHART, SECRETS, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []



@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"supernodes": {"replicas": "three"}}, "/supernodes/replicas': got string, want integer"),
        ({"supernodes": {"replicas": 0}}, "/supernodes/replicas"),
        ({"supernodes": {"nodeConfig": {"partition-id": 3}}}, "propertyName 'partition-id'"),
        ({"superlink": {"prot": 8000}}, "additional properties 'prot' not allowed"),
        ({"secagg": {"rosterAdminKey": "xyz"}}, "/secagg/rosterAdminKey"),
    ],
)
def test_values_schema_rejects_bad_values(values: dict, message: str) -> None:
    report = helm.lint(CHART, {**SECRETS, **values}, strict=True)
    assert any(message in error for error in report["errors"]), report


def test_dashboards_and_rules_of_the_repository_become_configmaps(tmp_path) -> None:
    dashboards = sorted((REPO / "deploy/grafana/dashboards").glob("*.json"))
    rendered = [
        m for m in _render(SECRETS) if m["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    assert sorted(k for m in rendered for k in m["data"]) == [p.name for p in dashboards]
    # The mechanism, with a dashboard and a rule file in a copy of the chart:
    chart = tmp_path / "flwr-guard"
    shutil.copytree(CHART, chart, symlinks=False)
    for folder in ("files/dashboards", "files/rules"):  # only the samples below
        for old in (chart / folder).iterdir():
            if old.is_file() and not old.name.startswith("."):
                old.unlink()
    (chart / "files/dashboards/Privacy_Budget.json").write_text(json.dumps({"title": "ε"}))
    (chart / "files/rules/privacy.yml").write_text("groups: []\n")
    manifests = _render(SECRETS, chart)
    _validate(manifests, tmp_path)
    board = _configmap(manifests, f"{RELEASE}-dashboard-privacy-budget")
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert board["metadata"]["annotations"]["grafana_folder"] == "flwr-guard"
    assert json.loads(board["data"]["Privacy_Budget.json"]) == {"title": "ε"}
    rules = _configmap(manifests, f"{RELEASE}-prometheus-rules")
    assert rules["data"] == {"privacy.yml": "groups: []\n"}


def test_rendered_prometheus_configuration_passes_promtool(tmp_path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed and could not be: `make tools` installs it (apt)")
    values = {**SECRETS, "metrics": {"pushgatewayUrl": "http://pushgateway.monitoring:9091"}}
    config = _configmap(_render(values), f"{RELEASE}-prometheus")["data"]["prometheus.yml"]
    path = tmp_path / "prometheus.yml"
    path.write_text(config)
    done = subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = {job["job_name"]: job for job in yaml.safe_load(config)["scrape_configs"]}
    assert jobs["flwr-guard"]["static_configs"][0]["targets"] == [
        f"{RELEASE}-superlink.{NAMESPACE}.svc:9464"
    ]
    assert jobs["pushgateway"]["static_configs"][0]["targets"] == ["pushgateway.monitoring:9091"]
    assert jobs["pushgateway"]["honor_labels"] is False  # each series stored under its source (prometheus.yml)


def test_the_chart_sets_the_compose_policy_and_a_ledger_claim_per_pod(tmp_path) -> None:
    """Same node config as the compose SuperNodes (colluder bound, DP floors, ledger
    directory), a PersistentVolumeClaim per pod for the ledger, and the ledger step
    before the SuperNode on it."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["supernodes"]["policy"] == CONTAINER_NODE_POLICY
    manifests = _render(SECRETS)
    _validate(manifests, tmp_path)
    (statefulset,) = [m for m in manifests if m["kind"] == "StatefulSet"]
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "ledger"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "64Mi"
    pod = statefulset["spec"]["template"]["spec"]
    assert "ledger" not in [v["name"] for v in pod["volumes"]]  # the claim, not an emptyDir
    containers = {c["name"]: c for c in [*pod["initContainers"], *pod["containers"]]}
    assert pod["initContainers"][0]["name"] == "ledger-init"
    for name in ("ledger-init", "supernode"):
        assert {"name": "ledger", "mountPath": LEDGER_DIR} in containers[name]["volumeMounts"]
    args = containers["supernode"]["args"]
    compose = compose_topology("tls")
    for index in range(3):
        node_config = args[args.index("--node-config") + 1].replace(POD_INDEX, str(index))
        assert node_config == compose.supernode_node_config(index)
        assert parse_config_args([node_config])["dp-sgd-ledger"] == LEDGER_DIR
    # a storage class is passed through; a key of nodeConfig overrides the policy's
    manifests = _render({**SECRETS, "supernodes": {
        "ledger": {"size": "1Gi", "storageClassName": "fast"},
        "nodeConfig": {"secagg-max-colluders": 1, "secagg-min-honest-others": 2}}})
    (statefulset,) = [m for m in manifests if m["kind"] == "StatefulSet"]
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert (claim["spec"]["storageClassName"], claim["spec"]["resources"]["requests"]["storage"]) == (
        "fast", "1Gi")
    (node,) = statefulset["spec"]["template"]["spec"]["containers"]
    config = parse_config_args(
        [node["args"][node["args"].index("--node-config") + 1].replace(POD_INDEX, "0")])
    assert config["secagg-max-colluders"] == 1


def test_the_ledger_directory_cannot_be_moved_off_its_claim() -> None:
    with pytest.raises(helm.HelmError, match="dp-sgd-ledger"):
        _render({**SECRETS, "supernodes": {"nodeConfig": {"dp-sgd-ledger": "/tmp/x"}}})


def test_every_supernode_pod_runs_under_the_node_guard_with_the_images_allowlist(tmp_path) -> None:
    """The StatefulSet's SuperNode container is the node guard (dumb-init, then
    `flwr-guard node start` with flower-supernode's arguments); its node config names the
    image's allow-list and requires SecAgg+; an app is admitted next to it through
    nodeConfig; a container that runs flower-supernode directly is reported as drift."""
    manifests = _render(SECRETS)
    (statefulset,) = [m for m in manifests if m["kind"] == "StatefulSet"]
    (node,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert node["command"] == list(GUARD_ENTRYPOINT) == ["dumb-init", "--", "flwr-guard", "node", "start", "--app-isolation", "user"]
    # root only to start each app as uid 65530, with the four capabilities that takes
    context = node["securityContext"]
    assert (context["runAsUser"], context["runAsNonRoot"], context["allowPrivilegeEscalation"]) == (0, False, False)
    assert context["capabilities"] == {"drop": ["ALL"], "add": ["SETUID", "SETGID", "CHOWN", "DAC_OVERRIDE"]}
    assert context["readOnlyRootFilesystem"] is True
    assert "flower-supernode" not in node["args"] and "--isolation" not in node["args"]
    config = parse_config_args([node["args"][node["args"].index("--node-config") + 1].replace(POD_INDEX, "1")])
    assert config["guard-fab-allowlist"] == IMAGE_ALLOWLIST
    assert config["guard-require-secagg"] is True
    assert "guard-fab-allow-any" not in config
    # the operator admits another app's hash next to the image's allow-list
    extra = "0123456789abcdef" * 4
    manifests = _render({**SECRETS, "supernodes": {"nodeConfig": {"guard-fab-hashes": extra}}})
    _validate(manifests, tmp_path)
    (statefulset,) = [m for m in manifests if m["kind"] == "StatefulSet"]
    (node,) = statefulset["spec"]["template"]["spec"]["containers"]
    config = parse_config_args([node["args"][node["args"].index("--node-config") + 1].replace(POD_INDEX, "0")])
    assert (config["guard-fab-hashes"], config["guard-fab-allowlist"]) == (extra, IMAGE_ALLOWLIST)
    # a SuperNode outside the guard is drift
    node["command"] = ["flower-supernode"]
    topology = container_topology(nodes=3, superlink_host=f"{RELEASE}-superlink", secure=True,
                                  node_config={"guard-fab-hashes": extra})
    problems = k8s_drift(manifests, topology)
    assert len(problems) == 3 and all(p.startswith(f"supernode pod {i}: command is ['flower-supernode'")
                                      for i, p in enumerate(problems))

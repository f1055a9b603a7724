"""Prometheus configuration and Grafana provisioning of the compose cluster.

`promtool check config` (Debian's `prometheus` package; `make tools` installs it)
validates deploy/prometheus/prometheus.yml together with the alert rules it loads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import REPO

from flwr_guard.deployment import free_port

PROMETHEUS = REPO / "deploy" / "prometheus"
GRAFANA = REPO / "deploy" / "grafana"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed and could not be: `make tools` installs it (apt)",
)


def _check_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(PROMTOOL), "check", "config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _compose_services() -> dict:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "docker-compose"), "config", "--format", "json"],
        cwd=REPO / "deploy" / "compose",
        env={"PATH": os.environ["PATH"], "GRAFANA_ADMIN_PASSWORD": "test"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout)["services"]


@needs_promtool
def test_promtool_accepts_the_configuration_and_its_rules() -> None:
    done = _check_config(PROMETHEUS / "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_rule_files_in_rules_folder_are_loaded(tmp_path) -> None:
    """A broken rule file in rules/ makes the configuration fail: the glob reaches it."""
    shutil.copy(PROMETHEUS / "prometheus.yml", tmp_path / "prometheus.yml")
    (tmp_path / "rules").mkdir()
    rule = {"groups": [{"name": "t", "rules": [{"alert": "A", "expr": "up == 0"}]}]}
    (tmp_path / "rules" / "ok.yml").write_text(yaml.safe_dump(rule))
    done = _check_config(tmp_path / "prometheus.yml")
    assert done.returncode == 0 and "1 rules found" in done.stdout + done.stderr
    broken = {"groups": [{"name": "b", "rules": [{"alert": "B", "expr": "up =="}]}]}
    (tmp_path / "rules" / "broken.yml").write_text(yaml.safe_dump(broken))
    done = _check_config(tmp_path / "prometheus.yml")
    assert done.returncode != 0 and "broken.yml" in done.stdout + done.stderr


def test_scrape_targets_are_the_compose_services() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["rules/*.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    services = _compose_services()
    exporter = jobs["flwr-guard"]["static_configs"][0]["targets"]
    assert exporter == ["superlink:9464"]
    assert services["superlink"]["environment"]["FLWR_GUARD_METRICS_ADDRESS"] == "0.0.0.0:9464"
    # the Pushgateway's copies keep a job of their own (exported_job = the pusher's)
    assert jobs["pushgateway"]["honor_labels"] is False
    assert jobs["pushgateway"]["static_configs"][0]["targets"] == ["pushgateway:9091"]
    assert "pushgateway" in services and "prometheus" in services


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards_folder() -> None:
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    assert [(d["type"], d["uid"], d["url"]) for d in datasources] == [
        ("prometheus", "prometheus", "http://prometheus:9090")
    ]
    (provider,) = yaml.safe_load(
        (GRAFANA / "provisioning/dashboards/flwr-guard.yml").read_text()
    )["providers"]
    mounts = {v["target"]: Path(v["source"]) for v in _compose_services()["grafana"]["volumes"]}
    assert mounts[provider["options"]["path"]] == GRAFANA / "dashboards"
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    assert provider["folder"] == "flwr-guard"


@pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="the prometheus server is not installed and could not be: `make tools` installs it",
)
def test_prometheus_starts_with_the_compose_flags_and_scrapes_both_jobs(tmp_path) -> None:
    """A dry start on loopback: the compose service's own flags, paths mapped to here."""
    command = _compose_services()["prometheus"]["command"]
    places = {"/etc/prometheus": str(PROMETHEUS), "/prometheus": str(tmp_path / "data")}

    def mapped_arg(arg: str) -> str:
        flag, _, value = arg.partition("=")
        for inside, here in places.items():
            if value == inside or value.startswith(inside + "/"):
                return f"{flag}={here}{value[len(inside):]}"
        return arg

    mapped = [mapped_arg(arg) for arg in command]
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    server = subprocess.Popen(
        [shutil.which("prometheus"), *mapped, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        api = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"{api}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        assert server.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
        expected = {("flwr-guard", "superlink:9464"), ("pushgateway", "pushgateway:9091")}
        scraped: set[tuple[str, str]] = set()
        while time.monotonic() < deadline and not expected <= scraped:  # discovery is async
            active = httpx.get(f"{api}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            scraped = {(t["labels"]["job"], t["labels"]["instance"]) for t in active}
            time.sleep(0.5)
        assert expected <= scraped
        flags = httpx.get(f"{api}/api/v1/status/flags", timeout=5).json()["data"]
        assert flags["web.enable-lifecycle"] == "true"
        assert flags["config.file"] == str(PROMETHEUS / "prometheus.yml")
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()

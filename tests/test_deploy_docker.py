"""Container images (docker/): hadolint, what each target runs as, and the health check.

The Dockerfile is linted with hadolint (every rule, style included) and read for the
properties that matter (tests/test_deploy_compose_cluster.py builds and runs it): pinned bases, a non-root
numeric user in every image, flwr-guard installed, run-time dependency installation
off, a /health check in the SuperLink image, and Flower command lines that parse.
"""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
from conftest import REPO

from flwr_guard.deployment.manifests import check_command_line

DOCKERFILES = sorted((REPO / "docker").glob("**/Dockerfile*"))
HADOLINT = Path(sys.executable).parent / "hadolint"
TARGETS = ("superlink", "supernode", "supernode-cuda", "superexec")


def _stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Instructions of each named stage: ``{stage: [(INSTRUCTION, arguments)]}``."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            base, _, name = args.partition(" AS ")
            current = [("FROM", base.strip())]
            stages[name.strip()] = current
        else:
            current.append((instruction, args.strip()))
    return stages


def _chain(stages: dict, target: str) -> list[tuple[str, str]]:
    """A target's instructions, its parent stages' first."""
    own = stages[target]
    parent = own[0][1]
    return (_chain(stages, parent) if parent in stages else [own[0]]) + own[1:]


def test_there_are_dockerfiles_and_hadolint_passes_every_rule() -> None:
    assert DOCKERFILES, "no Dockerfile under docker/"
    done = subprocess.run(
        [str(HADOLINT), "--failure-threshold", "style", "--format", "json", *map(str, DOCKERFILES)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, json.dumps(json.loads(done.stdout or "[]"), indent=1)
    # and hadolint does fail on what it should: a root image on a floating tag
    bad = subprocess.run(
        [str(HADOLINT), "-"],
        input="FROM python:latest\nRUN pip install flwr\nUSER root\n",
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode != 0 and "DL3007" in bad.stdout and "DL3013" in bad.stdout


def test_every_image_is_pinned_non_root_and_installs_flwr_guard() -> None:
    stages = _stages(REPO / "docker" / "Dockerfile")
    assert set(TARGETS) <= set(stages)
    args = dict(
        line.split(" ", 1)[1].split("=", 1)
        for line in (REPO / "docker/Dockerfile").read_text().splitlines()
        if line.startswith("ARG ") and "=" in line
    )
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", args["PYTHON_IMAGE"])
    for target in TARGETS:
        chain = _chain(stages, target)
        assert chain[0] == ("FROM", "${PYTHON_IMAGE}")
        users = [a for i, a in chain if i == "USER"]
        assert users and users[-1] == "10001:10001", target
        copies = [a for i, a in chain if i == "COPY" and "/opt/venv" in a]
        assert copies == [
            f"--from=venv-{'cuda' if target.endswith('cuda') else 'cpu'} /opt/venv /opt/venv"
        ]
        env = " ".join(a for i, a in chain if i == "ENV")
        assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in env
        assert "FLWR_DISABLE_UPDATE_CHECK=1" in env
        assert ("ENTRYPOINT", '["dumb-init", "--"]') in chain
        cmd = json.loads([a for i, a in chain if i == "CMD"][-1])
        check_command_line(cmd)
    for venv in ("venv-cpu", "venv-cuda"):
        run = " ".join(a for i, a in _chain(stages, venv) if i == "RUN")
        assert '"torch==${TORCH_VERSION}"' in run and "dumb-init==" in run and " ." in run
    assert "download.pytorch.org/whl/cpu" in " ".join(a for _, a in stages["venv-cpu-deps"])


def test_superlink_image_checks_health_and_starts_without_dependency_installation() -> None:
    chain = _chain(_stages(REPO / "docker" / "Dockerfile"), "superlink")
    (health,) = [a for i, a in chain if i == "HEALTHCHECK"]
    assert health.endswith('CMD ["python", "-m", "flwr_guard.deployment.healthcheck"]')
    cmd = json.loads([a for i, a in chain if i == "CMD"][-1])
    assert "--disable-runtime-dependency-installation" in cmd
    assert ("EXPOSE", "8000") in chain


def test_dockerignore_keeps_secrets_and_environments_out_of_the_build_context() -> None:
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"**/.venv", "**/.git", "**/*.key", "**/credentials/", "**/.env"} <= ignored
    for needed in ("src", "pyproject.toml", "README.md"):  # what the Dockerfile copies
        assert not any(needed.startswith(p.rstrip("/")) for p in ignored)


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _healthcheck(url: str, ca: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flwr_guard.deployment.healthcheck"],
        env={"FLWR_GUARD_HEALTH_URL": url, "FLWR_GUARD_HEALTH_CA": ca},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_container_healthcheck_exit_status(health_server: str, tmp_path) -> None:
    assert _healthcheck(f"{health_server}/health").returncode == 0
    missing = _healthcheck(f"{health_server}/nope")
    assert missing.returncode == 1 and "not healthy" in missing.stderr
    nothing = _healthcheck("http://127.0.0.1:9/health")  # discard port: nobody listens
    assert nothing.returncode == 1
    bad_ca = _healthcheck("https://127.0.0.1:9/health", str(tmp_path / "no-such-ca.crt"))
    assert bad_ca.returncode == 1 and "cannot read the CA certificate" in bad_ca.stderr


def test_images_build_behind_a_mirror_or_proxy_without_the_extras(tmp_path) -> None:
    """Index URLs are build arguments, the CA bundle and pip.conf are build secrets (never
    in a layer); the image's requirements are exactly pyproject's `dependencies` (none of
    the extras: no Ray, no flwr-datasets, datasets or pyarrow), installed in a layer
    built from pyproject.toml alone (a source change does not reinstall torch), as the
    Dockerfile's own command computes them; tests folders, pip and setuptools are pruned
    and an import of what the deployment loads checks each step."""
    stages = _stages(REPO / "docker" / "Dockerfile")
    for variant in ("cpu", "cuda"):
        deps, own = stages[f"venv-{variant}-deps"], stages[f"venv-{variant}"]
        assert own[0] == ("FROM", f"venv-{variant}-deps")
        for stage in (deps, own):
            args = {a.split("=")[0] for i, a in stage if i == "ARG"}
            assert {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"} <= args, variant
            (run,) = [a for i, a in stage if i == "RUN"]
            assert "--mount=type=secret,id=ca_bundle" in run and "--mount=type=secret,id=pip_conf" in run
            assert "PIP_CERT=/run/secrets/ca_bundle" in run and "PIP_CONFIG_FILE=/run/secrets/pip_conf" in run
        assert "TORCH_VERSION" in {a.split("=")[0] for i, a in deps if i == "ARG"}
        (run,) = [a for i, a in deps if i == "RUN"]
        assert "-r /src/requirements-deploy.txt" in run and " . " not in run
        assert '"$SP/torch/test"' in run and "! -name torch_shm_manager" in run
        assert "-type d -name tests -prune -exec rm -rf {} +" in run
        assert 'python -c "import torch, opacus, captum.attr' in run
        # the source arrives only after the requirements' layer
        assert not any(i == "COPY" and "src" in a for i, a in deps)
        assert ("COPY", "src ./src") in own
        (run,) = [a for i, a in own if i == "RUN"]
        assert "pip install --no-cache-dir --no-compile --no-deps ." in run
        assert 'python -c "import flwr_guard.apps.digits.client_app' in run
        assert run.index("import flwr_guard.apps") < run.index("pip uninstall --yes --quiet pip setuptools")
    assert [a for i, a in stages["venv-base"] if i == "COPY"] == ["pyproject.toml ./"]
    assert "TORCH_INDEX_URL" in {a.split("=")[0] for i, a in stages["venv-cpu-deps"] if i == "ARG"}
    (cpu_run,) = [a for i, a in stages["venv-cpu-deps"] if i == "RUN"]
    assert '--no-deps "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in cpu_run
    # the requirements step, run here on this repository's pyproject.toml
    (generate,) = [a for i, a in stages["venv-base"] if i == "RUN" and "tomllib" in a]
    command = generate.split(" > ")[0]
    assert command.startswith("python -c ")
    code = command[len("python -c "):].strip().strip('"')  # the shell passes it as is
    (tmp_path / "pyproject.toml").write_bytes((REPO / "pyproject.toml").read_bytes())
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                          capture_output=True, text=True, check=True)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = done.stdout.splitlines()
    assert lines == project["dependencies"]
    assert not any(x.startswith(("flwr[", "flwr-datasets", "datasets", "ray", "pyarrow")) for x in lines)
    # what the images leave out is in the extras the host's venv installs
    extras = project["optional-dependencies"]
    assert any(x.startswith("flwr-datasets") for x in extras["data"])
    assert any(x.startswith("flwr[simulation]") for x in extras["simulation"])
    assert "flwr-guard[data,simulation]" in extras["dev"]

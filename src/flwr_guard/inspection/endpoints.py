"""Endpoint audit: do a deployment's HTTP endpoints or its metrics exporter expose
gradients, per-example data or debug interfaces?

Two checks, both read-only HTTP GETs with a short timeout:

- **service endpoints** (e.g. the SuperLink's HTTP port, a SuperNode's health port):
  each well-known debug / admin path in :data:`DEBUG_PATHS` that answers 200 is a
  finding (``debug-endpoint``); plain ``http://`` on an address that is not loopback is
  a finding (``plaintext``: updates and metrics travel unencrypted).
- **metrics exporters** (Prometheus text format, parsed with
  ``prometheus_client.parser``): a metric family named like gradients or per-example
  data (``gradient-metric`` — a ``*_norm`` summary is fine — ``per-example-metric``),
  a label that identifies samples
  (``per-example-label``: ``sample``, ``example_id``, ...), and a family with more than
  ``max_series`` label sets (``high-cardinality-metric``) are findings.

An unreachable URL is reported as ``unreachable`` (not silently passed).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from urllib.parse import urljoin, urlparse

import httpx
from prometheus_client.parser import text_string_to_metric_families

from flwr_guard.inspection.reply import GRADIENT_PATTERN, PER_EXAMPLE_PATTERN

DEBUG_PATHS: tuple[str, ...] = (
    "/debug/pprof/",
    "/debug/vars",
    "/debug",
    "/admin",
    "/actuator",
    "/actuator/env",
    "/env",
    "/config",
    "/server-status",
    "/.env",
    "/console",
    "/trace",
)
SAMPLE_LABEL_PATTERN = r"^(sample|example|record|instance|image|item)(_?(id|idx|index))?$"


@dataclass(frozen=True)
class EndpointFinding:
    """One exposure found at ``url`` (``kind`` as in the module docstring)."""

    url: str
    kind: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _is_loopback(host: str | None) -> bool:
    if not host or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_service(
    base_url: str, client: httpx.Client, paths: Iterable[str] = DEBUG_PATHS
) -> list[EndpointFinding]:
    """Probe ``base_url`` for debug / admin paths and plaintext exposure."""
    found: list[EndpointFinding] = []
    parsed = urlparse(base_url)
    if parsed.scheme == "http" and not _is_loopback(parsed.hostname):
        found.append(EndpointFinding(base_url, "plaintext",
                                     "plain HTTP on a non-loopback address (no TLS)"))
    try:
        client.get(base_url)
    except httpx.HTTPError as err:
        return found + [EndpointFinding(base_url, "unreachable", type(err).__name__)]
    for path in paths:
        url = urljoin(base_url.rstrip("/") + "/", path.lstrip("/"))
        try:
            response = client.get(url)
        except httpx.HTTPError as err:
            found.append(EndpointFinding(url, "unreachable", type(err).__name__))
            continue
        if response.status_code == 200 and response.content:
            found.append(EndpointFinding(url, "debug-endpoint",
                                         f"answers 200 with {len(response.content)} bytes"))
    return found


def check_exporter_text(
    url: str, text: str, max_series: int = 100
) -> list[EndpointFinding]:
    """Findings of a Prometheus text exposition ``text`` served at ``url``.

    Raises:
        ValueError: if ``text`` is not Prometheus text format.
    """
    per_example = re.compile(PER_EXAMPLE_PATTERN, re.IGNORECASE)
    gradient = re.compile(GRADIENT_PATTERN, re.IGNORECASE)
    sample_label = re.compile(SAMPLE_LABEL_PATTERN, re.IGNORECASE)
    found: list[EndpointFinding] = []
    for family in text_string_to_metric_families(text):
        name = family.name
        if per_example.search(name.replace("_", "-")):
            found.append(EndpointFinding(url, "per-example-metric",
                                         f"metric {name} is named like per-example data"))
        elif gradient.search(name) and not name.endswith("_norm"):
            found.append(EndpointFinding(url, "gradient-metric",
                                         f"metric {name} is named like a gradient"))
        labels = {key for sample in family.samples for key in sample.labels}
        for label in sorted(labels):
            if sample_label.match(label):
                found.append(EndpointFinding(url, "per-example-label",
                                             f"metric {name} has label {label!r}"))
        series = {tuple(sorted(s.labels.items())) for s in family.samples}
        if len(series) > max_series:
            found.append(EndpointFinding(url, "high-cardinality-metric",
                                         f"metric {name} has {len(series)} series > {max_series}"))
    return found


def check_exporter(url: str, client: httpx.Client, max_series: int = 100) -> list[EndpointFinding]:
    """Fetch a metrics exporter and check it (:func:`check_exporter_text`)."""
    try:
        response = client.get(url)
    except httpx.HTTPError as err:
        return [EndpointFinding(url, "unreachable", type(err).__name__)]
    if response.status_code != 200:
        return [EndpointFinding(url, "unreachable", f"HTTP {response.status_code}")]
    try:
        return check_exporter_text(url, response.text, max_series)
    except ValueError as err:
        return [EndpointFinding(url, "not-prometheus", str(err)[:200])]


def audit_endpoints(
    services: Iterable[str] = (),
    exporters: Iterable[str] = (),
    timeout_s: float = 3.0,
    max_series: int = 100,
) -> list[EndpointFinding]:
    """Check every service base URL and every exporter URL; return all findings.

    Raises:
        ValueError: for a URL that is not ``http://`` or ``https://``.
    """
    urls = list(services) + list(exporters)
    for url in urls:
        if urlparse(url).scheme not in ("http", "https"):
            raise ValueError(f"not an http(s) URL: {url!r}")
    found: list[EndpointFinding] = []
    with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
        for url in services:
            found += check_service(url, client)
        for url in exporters:
            found += check_exporter(url, client, max_series)
    return found

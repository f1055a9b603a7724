"""Shared fixtures: a private cache directory and helpers to check for orphans."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True, scope="session")
def _flower_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    """No update check; the partition cache lives in the session's temp folder."""
    os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    os.environ.setdefault("FLWR_GUARD_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


def alive(processes: Iterable[dict]) -> list[dict]:
    """The processes of a demo summary that still run (same PID *and* start time)."""
    survivors = []
    for record in processes:
        try:
            proc = psutil.Process(record["pid"])
            if (
                abs(proc.create_time() - record["create_time"]) < 1e-3
                and proc.status() != psutil.STATUS_ZOMBIE
            ):
                survivors.append(record)
        except psutil.NoSuchProcess:
            pass
    return survivors

"""flwr-guard without its extras (what the container images hold): what needs an extra
says which one, and what does not need it works (tests/test_data.py for the data)."""

from __future__ import annotations

import subprocess
import sys

import pytest

NOT_INSTALLED = """
import importlib.abc
import sys

BLOCKED = tuple(sys.argv[1].split(","))


class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, NotInstalled())
from flwr_guard.demo import DemoOptions
try:
    DemoOptions(**eval(sys.argv[2])).validate()
    print("valid")
except ValueError as error:
    print("ValueError:", error)
"""


@pytest.mark.parametrize(("blocked", "options", "expected"), [
    ("ray", "{'simulation': True}",
     "ValueError: --simulation needs 'ray', which is not installed: pip install \"flwr-guard[simulation]\""),
    ("datasets,flwr_datasets,pyarrow", "{'partition': 'dirichlet'}",
     "ValueError: --partition dirichlet needs 'flwr_datasets', which is not installed: "
     "pip install \"flwr-guard[data]\""),
    # controls: what needs no extra is valid without it, and with them installed it is valid
    ("ray,datasets,flwr_datasets,pyarrow", "{'partition': 'iid'}", "valid"),
    ("nothing", "{'simulation': True, 'partition': 'dirichlet'}", "valid"),
])
def test_the_demo_names_the_extra_it_needs(blocked: str, options: str, expected: str) -> None:
    done = subprocess.run([sys.executable, "-c", NOT_INSTALLED, blocked, options], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == expected

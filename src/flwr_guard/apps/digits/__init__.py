"""Reference Flower app: a small CNN on scikit-learn's bundled digits.

The Flower app manifest (``pyproject.toml`` with ``[tool.flwr.app]`` and the run
configuration in ``[tool.flwr.app.config]``) ships next to this file, so
``flwr run <this folder> <connection>`` works from an installed wheel too;
:func:`app_dir` returns that folder.
"""

from importlib.resources import files
from pathlib import Path


def app_dir() -> Path:
    """Return the folder holding the digits app's Flower manifest (``pyproject.toml``)."""
    return Path(str(files(__name__)))

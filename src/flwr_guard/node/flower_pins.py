"""The Flower 1.41 internals the node guard relies on, checked in one place.

Flower 1.41 has no public seam to run something else than ``flwr-clientapp`` for a
SuperNode's ClientApp tasks, nor a public client for its Runtime API. The node guard
therefore uses these modules, pinned to Flower 1.41.x; :func:`check_flower` verifies
each name and signature at start-up (the guard refuses to start on a mismatch), and
``tests/test_node_guard_units.py`` runs it so that an upgrade fails loudly in CI:

- ``flwr.supercore.superexec.run_superexec``: ``run_superexec`` calls the module-level
  ``get_executor(executor_type, executor_config=..., insecure=..., root_certificates_path=...)``
  (replaced in the guard's SuperExec process only);
- ``flwr.supercore.superexec.executor``: ``SubprocessExecutor``, ``ExecutionSpec``
  (``task_type``, ``runtime_api_address``, ``token``, ``insecure``,
  ``root_certificates_path``, ``runtime_dependency_install``, ``parent_pid``),
  ``LaunchResult.accepted/failed``;
- ``flwr.supernode.runtime.run_clientapp``: ``pull_task_input(client)``,
  ``push_message(client, message, context)``,
  ``push_task_output(client, context, sub_status, details)``;
- ``flwr.common.args.add_args_flwr_app_common(parser, include_token_stdin=...)``;
- ``flwr.cli.install.install_from_fab``, ``flwr.clientapp.utils.get_load_client_app_fn``
  (the app's child process loads the app as ``flwr-clientapp`` does);
- ``flwr.cli.build.build_fab_from_files`` writing ``.info/CONTENT`` and
  ``flwr.cli.utils.collect_files`` (FAB signatures).
"""

from __future__ import annotations

import importlib
import inspect

SUPPORTED = "1.41."


class FlowerMismatch(RuntimeError):
    """The installed Flower lacks a name or signature the node guard relies on."""


def _params(obj: object) -> list[str]:
    if not callable(obj):
        raise FlowerMismatch(f"{obj!r} is not callable in the installed Flower")
    return list(inspect.signature(obj).parameters)


def check_flower() -> str:
    """Check every pinned name (see the module docstring); return Flower's version.

    Raises:
        FlowerMismatch: naming the first name or signature that differs, and the fix.
    """
    from importlib.metadata import version

    found = version("flwr")
    problems = []
    if not found.startswith(SUPPORTED):
        problems.append(f"flwr {found} is installed; the node guard is pinned to {SUPPORTED}x")
    expected = {
        ("flwr.supercore.superexec.run_superexec", "get_executor"):
            ["executor_type", "executor_config", "insecure", "root_certificates_path"],
        ("flwr.supercore.superexec.run_superexec", "run_superexec"): None,
        ("flwr.supernode.runtime.run_clientapp", "pull_task_input"): ["client"],
        ("flwr.supernode.runtime.run_clientapp", "push_message"): ["client", "message", "context"],
        ("flwr.supernode.runtime.run_clientapp", "push_task_output"):
            ["client", "context", "sub_status", "details"],
        ("flwr.common.args", "add_args_flwr_app_common"):
            ["parser", "include_token_stdin", "include_runtime_dependency_install"],
        ("flwr.cli.install", "install_from_fab"): ["fab_file", "install_dir", "skip_prompt"],
        ("flwr.clientapp.utils", "get_load_client_app_fn"): ["default_app_ref", "app_path", "multi_app"],
        ("flwr.cli.build", "build_fab_from_files"): ["files"],
        ("flwr.cli.utils", "collect_files"): ["root"],
        ("flwr.supercore.cli.flower_superexec", "flower_superexec"): [],
    }
    for (module_name, name), params in expected.items():
        try:
            obj = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError):
            problems.append(f"{module_name}.{name} is missing")
            continue
        if params is not None and _params(obj) != params:
            problems.append(f"{module_name}.{name}{tuple(_params(obj))} != {tuple(params)}")
    source = inspect.getsource(importlib.import_module("flwr.supercore.superexec.run_superexec"))
    if "executor = get_executor(" not in source:
        problems.append("run_superexec no longer selects its executor through get_executor(...)")
    from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult, SubprocessExecutor

    fields = set(inspect.signature(ExecutionSpec).parameters)
    needed = {"task_type", "runtime_api_address", "token", "insecure", "root_certificates_path",
              "runtime_dependency_install", "parent_pid"}
    if not needed <= fields:
        problems.append(f"ExecutionSpec lacks {sorted(needed - fields)}")
    for method in ("launch", "get_eligible_capacity", "wait_for_capacity", "reconcile", "close"):
        if not callable(getattr(SubprocessExecutor, method, None)):
            problems.append(f"SubprocessExecutor.{method} is missing")
    if not (callable(getattr(LaunchResult, "accepted", None)) and callable(getattr(LaunchResult, "failed", None))):
        problems.append("LaunchResult.accepted/failed are missing")
    if problems:
        raise FlowerMismatch(
            "the flwr-guard node guard relies on Flower 1.41 internals that differ here: "
            + "; ".join(problems) + " (install flwr 1.41.x, or update flwr_guard.node)")
    return found

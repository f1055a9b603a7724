"""The node guard's FAB allow-list for the container images: the reference app pinned.

The SuperNode images run every ClientApp under the node operator's guard
(``flwr-guard node start``, docs/deploy.md "The node guard"), which refuses every FAB
that its allow-list does not admit. The compose cluster and the Helm chart submit one
app, the reference app of the image (``/opt/flwr-guard/apps/digits``: its
``pyproject.toml``; the code it names is the installed ``flwr_guard`` package). Each
SuperNode image pins that app's FAB hash at build time::

    python -m flwr_guard.deployment.fab_allowlist /opt/flwr-guard/apps/digits \\
        /opt/flwr-guard/fab-allowlist.toml

and the SuperNodes' node config names the file (``guard-fab-allowlist``). The hash is
Flower's (SHA-256 of the FAB that ``flwr run APP_DIR`` builds: Flower 1.41 writes every
zip entry with a fixed date, so the same files give the same hash in any image or
container); ``submit`` runs ``flwr run`` on the same directory of the same image, so its
FAB is admitted and any other FAB is refused. An operator admits another app by adding
its hash (``flwr-guard node fab-hash APP_DIR``) or a trusted publisher key in node config
(``guard-fab-hashes``, ``guard-fab-trusted-keys``: added to the file's), or by mounting
an own allow-list file over this one.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

#: Where the SuperNode images hold the allow-list (outside the app directory: a file in
#: it would be packed into the FAB and change the hash it pins).
IMAGE_ALLOWLIST = "/opt/flwr-guard/fab-allowlist.toml"


def allowlist_toml(fab_hashes: list[str]) -> str:
    """The allow-list file (``flwr_guard.node.allowlist`` format) pinning ``fab_hashes``."""
    lines = ",\n".join(f'  "{h}"' for h in fab_hashes)
    return ("# flwr-guard node guard allow-list (node config guard-fab-allowlist), written by\n"
            "# python -m flwr_guard.deployment.fab_allowlist: the FAB hash of each app below.\n"
            f"fab-hashes = [\n{lines},\n]\ntrusted-keys = []\n")


def write_allowlist(app_dirs: list[str | os.PathLike[str]], out: str | os.PathLike[str]) -> list[str]:
    """Pin the FABs of ``app_dirs`` (as ``flwr run`` builds them) in the allow-list ``out``.

    Returns:
        The FAB hashes (64 lowercase hex digits each), in the order of ``app_dirs``.

    Raises:
        FileNotFoundError: an app directory without ``pyproject.toml``.
    """
    from flwr.cli.build import build_fab_from_disk

    from flwr_guard.node.allowlist import fab_hash

    hashes = []
    for app in app_dirs:
        if not (Path(app) / "pyproject.toml").is_file():
            raise FileNotFoundError(f"{app} is not a Flower app directory (no pyproject.toml)")
        hashes.append(fab_hash(build_fab_from_disk(Path(app))))
    Path(out).write_text(allowlist_toml(hashes), encoding="utf-8")
    return hashes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flwr_guard.deployment.fab_allowlist",
        description="Write a node-guard allow-list that pins the FAB hash of each app directory.")
    parser.add_argument("app_dir", nargs="+", help="Flower app directories (with pyproject.toml)")
    parser.add_argument("out", help="the allow-list file to write (TOML)")
    args = parser.parse_args(argv)
    for app, digest in zip(args.app_dir, write_allowlist(args.app_dir, args.out), strict=True):
        print(f"pinned {app}: {digest} in {args.out}")


if __name__ == "__main__":
    main()

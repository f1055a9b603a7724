"""The node operator's FAB allow-list: which apps this SuperNode runs at all.

Core (no Flower imports). An app is allowed when its FAB's SHA-256 (Flower's FAB hash:
``hashlib.sha256(fab_bytes).hexdigest()``, what ``flwr-guard node fab-hash APP_DIR``
prints) is pinned, or when it carries a valid Ed25519 signature by a publisher key the
operator trusts (:mod:`flwr_guard.node.fab_signature`). Everything else is refused
before any of its code is installed or imported.

Node config keys (``flower-supernode --node-config``):

- ``guard-fab-allowlist``: path of a TOML file ``{fab-hashes = ["<64 hex>", ...],
  trusted-keys = ["<64 hex>", ...]}``;
- ``guard-fab-hashes``, ``guard-fab-trusted-keys``: the same lists inline, separated by
  commas or spaces (added to the file's);
- ``guard-fab-allow-any``: ``true`` to run any FAB (the policy mods still hold). Without
  an allow-list and without this key, the node refuses every app: the safe default.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr_guard.keys import NodeConfig
from flwr_guard.node.fab_signature import FabSignatureError, verify_fab

NODE_ALLOWLIST = NodeConfig.GUARD_FAB_ALLOWLIST
NODE_HASHES = NodeConfig.GUARD_FAB_HASHES
NODE_TRUSTED_KEYS = NodeConfig.GUARD_FAB_TRUSTED_KEYS
NODE_ALLOW_ANY = NodeConfig.GUARD_FAB_ALLOW_ANY
FAB_REFUSAL = "flwr-guard node refused the app:"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class AllowListError(ValueError):
    """An allow-list that does not parse (the message names the node-config key)."""


def fab_hash(fab: bytes) -> str:
    """Flower's FAB hash: SHA-256 of the FAB's bytes, 64 lowercase hex digits."""
    return hashlib.sha256(fab).hexdigest()


def _hex_list(value: Any, where: str) -> frozenset[str]:
    if isinstance(value, str):
        items = [v for v in re.split(r"[,\s]+", value) if v]
    elif isinstance(value, list):
        items = value
    else:
        raise AllowListError(f"{where} must be a list of 64-hex-digit strings, got {value!r}")
    out = set()
    for item in items:
        text = str(item).strip().lower()
        if not _HEX64.match(text):
            raise AllowListError(f"{where}: {item!r} is not 64 hex digits")
        out.add(text)
    return frozenset(out)


@dataclass(frozen=True)
class AllowList:
    """Pinned FAB hashes and trusted publisher keys (see the module docstring).

    Attributes:
        fab_hashes: SHA-256 hex digests of allowed FABs.
        trusted_keys: raw Ed25519 public keys (hex) whose signatures admit a FAB.
        allow_any: run every FAB (an explicit operator choice).
    """

    fab_hashes: frozenset[str] = frozenset()
    trusted_keys: frozenset[str] = frozenset()
    allow_any: bool = False

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> AllowList:
        """Read the allow-list from node config (and the file it names).

        Raises:
            AllowListError: a file that cannot be read or parsed, or a value that is not
                a list of 64 hex digits; the message names the key to fix.
        """
        hashes: frozenset[str] = frozenset()
        keys: frozenset[str] = frozenset()
        path = node_config.get(NODE_ALLOWLIST)
        if path:
            try:
                data = tomllib.loads(Path(str(path)).read_text(encoding="utf-8"))
            except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
                raise AllowListError(f"node config {NODE_ALLOWLIST}={path!r} cannot be read: {err}") from err
            unknown = sorted(set(data) - {"fab-hashes", "trusted-keys"})
            if unknown:
                raise AllowListError(f"{path} ({NODE_ALLOWLIST}) has unknown keys {unknown}: "
                                     "use fab-hashes and trusted-keys")
            hashes |= _hex_list(data.get("fab-hashes", []), f"fab-hashes in {path}")
            keys |= _hex_list(data.get("trusted-keys", []), f"trusted-keys in {path}")
        if node_config.get(NODE_HASHES):
            hashes |= _hex_list(node_config[NODE_HASHES], f"node config {NODE_HASHES}")
        if node_config.get(NODE_TRUSTED_KEYS):
            keys |= _hex_list(node_config[NODE_TRUSTED_KEYS], f"node config {NODE_TRUSTED_KEYS}")
        allow_any = node_config.get(NODE_ALLOW_ANY, False)
        if isinstance(allow_any, str) and allow_any.lower() in ("true", "false"):
            allow_any = allow_any.lower() == "true"
        if not isinstance(allow_any, bool):
            raise AllowListError(f"node config {NODE_ALLOW_ANY} must be true or false, got {allow_any!r}")
        return cls(hashes, keys, allow_any)

    def check(self, fab: bytes) -> str | None:
        """``None`` when ``fab`` may run here; else the reason (naming the fix).

        Pins are checked first (no parsing); then the signature (the FAB's manifest and
        every file hash are checked as well).
        """
        digest = fab_hash(fab)
        if self.allow_any or digest in self.fab_hashes:
            return None
        if not (self.fab_hashes or self.trusted_keys):
            return (f"this node has no FAB allow-list: the operator pins the app's FAB hash "
                    f"{digest} (node config {NODE_HASHES} or {NODE_ALLOWLIST}), trusts its "
                    f"publisher's key ({NODE_TRUSTED_KEYS}), or sets {NODE_ALLOW_ANY}=true")
        why = "no trusted publisher key is configured"
        if self.trusted_keys:
            try:
                verify_fab(fab, self.trusted_keys)
                return None
            except FabSignatureError as err:
                why = str(err)
        return (f"FAB {digest} is not on this node's allow-list ({why}): pin its hash in "
                f"{NODE_HASHES} / {NODE_ALLOWLIST} or have a trusted publisher sign it "
                "(flwr-guard node sign)")

    def digest(self) -> str:
        """A short digest of the allow-list (for the node's policy digest)."""
        text = "|".join([*sorted(self.fab_hashes), "#", *sorted(self.trusted_keys),
                         "#", str(self.allow_any)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

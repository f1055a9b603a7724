"""The client's own SecAgg+ policy: what the server may not lower (no Flower imports).

The server proposes the cohort and the parameters of every round; the client checks
them against a :class:`SecAggPolicy` it holds itself (built from its node config by
:func:`policy_from_node_config`, or in code), and refuses a round that asks for less.

The policy assumes **at most C corrupt members of the federation** (colluding with the
server), an absolute number: ``secagg-max-colluders``, or ``ceil(gamma x roster size)``
(:func:`~flwr_guard.secagg.params.colluders_for`), never a fraction of the cohort the
server picks (which could hold all C). From C it requires:

- a cohort, and every survivor set it signs (the inputs of one unmasked sum), of at
  least ``C + 1 + h`` members (``h``: ``secagg-min-honest-others``, default 2), so the
  sum holds at least h honest inputs besides the client's own, whichever C collude;
- a t that satisfies ``2t > k + c`` for the corrupt neighbours ``c`` the client can have
  with C colluders in the cohort (:func:`~flwr_guard.secagg.params.tolerated_corrupt_neighbours`;
  ``c = C`` for the complete graph), which implies ``t > c``;
- every cohort member's signing key on the federation roster.

It also bounds a multi-round session's length (``secagg-max-session-rounds``,
``secagg-max-session-seconds``): a session past either asks for a re-key.

The federation roster (:class:`Roster`) is the out-of-band list of the members'
Ed25519 signing keys (optionally with their node ids), in a JSON or TOML file named
in node config, optionally signed by an administrator's Ed25519 key. Without a
roster no guarantee holds against a server that fills the cohort with node ids it runs
itself (Sybils): that is the known limit of single-server secure aggregation without a
PKI. The client then refuses to run unless the user opted in to trust on first use
(keys pinned the first time they are seen) or it runs in Flower's simulation. Then no
bound holds against a server that brings its own keys, whatever C: C and h apply only
as set in node config (against a server that brings none); by default the sum floor
is ``secagg-min-cohort`` alone and t is checked for ``floor(gamma n)`` colluders in the
cohort of n, as before the absolute bound (nothing else is known, and nothing holds).
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from flwr_guard.keys import NodeConfig
from flwr_guard.secagg import crypto
from flwr_guard.secagg.context import RoundContext
from flwr_guard.secagg.errors import ProtocolError
from flwr_guard.secagg.params import (
    DEFAULT_CORRUPT_FRACTION,
    DEFAULT_DROPOUT_FRACTION,
    DEFAULT_MIN_HONEST_OTHERS,
    DEFAULT_SECURITY_BITS,
    colluders_for,
    max_degree,
    min_sum_size,
    minimum_threshold,
    tolerated_corrupt_neighbours,
)


class PolicyViolation(ProtocolError):
    """The server asked for less than this client's SecAgg+ policy accepts."""


ROSTER_LABEL = b"flwr-guard/secagg+/roster/v1"

# Node-config keys read by :func:`policy_from_node_config` (docs/secagg.md).
NODE_ROSTER = NodeConfig.SECAGG_ROSTER
NODE_ROSTER_ADMIN_KEY = NodeConfig.SECAGG_ROSTER_ADMIN_KEY
NODE_TOFU = NodeConfig.SECAGG_TRUST_ON_FIRST_USE
NODE_SIGNING_KEY = NodeConfig.SECAGG_SIGNING_KEY
NODE_MIN_COHORT = NodeConfig.SECAGG_MIN_COHORT
NODE_MIN_NUM_SHARES = NodeConfig.SECAGG_MIN_NUM_SHARES
NODE_MIN_THRESHOLD = NodeConfig.SECAGG_MIN_RECONSTRUCTION_THRESHOLD
NODE_CORRUPT_FRACTION = NodeConfig.SECAGG_CORRUPT_FRACTION
NODE_DROPOUT_FRACTION = NodeConfig.SECAGG_DROPOUT_FRACTION
NODE_SECURITY_BITS = NodeConfig.SECAGG_SECURITY_BITS
NODE_MAX_COLLUDERS = NodeConfig.SECAGG_MAX_COLLUDERS
NODE_MIN_HONEST_OTHERS = NodeConfig.SECAGG_MIN_HONEST_OTHERS
NODE_MAX_SESSION_ROUNDS = NodeConfig.SECAGG_MAX_SESSION_ROUNDS
NODE_MAX_SESSION_SECONDS = NodeConfig.SECAGG_MAX_SESSION_SECONDS
NODE_ROUND_LEDGER = NodeConfig.SECAGG_ROUND_LEDGER  # read by the mod (flwr_guard.secagg.round_ledger)

DEFAULT_MAX_SESSION_ROUNDS = 100
"""Most rounds one multi-round session may span (``server_round`` of an input minus that
of the set-up, plus one); the server's ``SecAggPlus(max_session_rounds=100)`` re-keys at
the same count."""
DEFAULT_MAX_SESSION_SECONDS = 86_400.0
"""Most seconds (wall clock, 24 h) between a session's opening on the client and an input."""


@dataclass(frozen=True)
class RosterMember:
    """One federation member: its Ed25519 public key (32 raw bytes), a name for logs,
    and optionally the Flower node id it must use (``None``: any id, the key decides;
    Flower's SuperLink assigns node ids, so a roster usually lists keys only)."""

    signing_key: bytes
    name: str = ""
    node_id: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.signing_key, bytes) or len(self.signing_key) != 32:
            raise ValueError(f"roster member {self.name!r}: signing key must be 32 bytes")
        if self.node_id is not None and not 0 <= self.node_id < 2**64:
            raise ValueError(f"roster member {self.name!r}: node id outside uint64")


@dataclass(frozen=True)
class Roster:
    """The federation's members, fixed out of band (a file every node holds).

    Raises (constructor):
        ValueError: a signing key listed twice.
    """

    members: tuple[RosterMember, ...]

    def __post_init__(self) -> None:
        keys = [m.signing_key for m in self.members]
        if len(set(keys)) != len(keys):
            raise ValueError("the roster lists a signing key twice")

    def member(self, signing_key: bytes) -> RosterMember | None:
        return next((m for m in self.members if m.signing_key == signing_key), None)

    def signed_payload(self) -> bytes:
        """What the administrator signs: the canonical JSON of the members (hex keys,
        sorted by key), under a label."""
        return ROSTER_LABEL + _canonical_members(self.members)

    def to_file(self, path: Path, admin_secret: bytes | None = None) -> None:
        """Write the roster as JSON (``.json``) with an administrator signature when
        ``admin_secret`` (raw Ed25519 private key) is given."""
        data: dict[str, Any] = {"members": json.loads(_canonical_members(self.members))}
        if admin_secret is not None:
            data["signature"] = crypto.sign(admin_secret, self.signed_payload()).hex()
        Path(path).write_text(json.dumps(data, indent=2) + "\n")


def _canonical_members(members: Iterable[RosterMember]) -> bytes:
    rows = [
        {"name": m.name, "signing-key": m.signing_key.hex(),
         **({} if m.node_id is None else {"node-id": m.node_id})}
        for m in sorted(members, key=lambda m: m.signing_key)
    ]
    return json.dumps(rows, sort_keys=True, separators=(",", ":")).encode()


def _hex_bytes(value: Any, size: int, what: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a hex string")
    try:
        raw = bytes.fromhex(value)
    except ValueError as err:
        raise ValueError(f"{what} is not hex: {err}") from None
    if len(raw) != size:
        raise ValueError(f"{what} must be {size} bytes ({2 * size} hex digits), got {len(raw)}")
    return raw


MAX_ROSTER_BYTES = 16 * 2**20
MAX_SESSION_ROUNDS_LIMIT = 10_000
"""Largest ``secagg-max-session-rounds`` (the key chains advance one hash per round)."""


def load_roster(path: str | Path, admin_key: bytes | None = None) -> Roster:
    """Read a roster file: JSON (``.json``) or TOML (any other suffix), with a list
    ``members`` of tables ``{signing-key = "<64 hex>", name = "...", node-id = 123}``
    (``name`` and ``node-id`` optional) and, when signed, ``signature`` (128 hex digits,
    Ed25519 over :meth:`Roster.signed_payload`).

    Args:
        admin_key: the administrator's raw Ed25519 public key; when given, the file
            must carry a valid signature by it.

    Raises:
        ValueError: unreadable, too large (16 MiB), malformed, a duplicate key, or a
            missing or invalid administrator signature (the message says which).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read the SecAgg+ roster {path}: {err}") from None
    if len(raw) > MAX_ROSTER_BYTES:
        raise ValueError(f"SecAgg+ roster {path} is larger than {MAX_ROSTER_BYTES} bytes")
    try:
        data = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"SecAgg+ roster {path} is not valid {path.suffix or 'TOML'}: {err}") from None
    rows = data.get("members") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"SecAgg+ roster {path} has no 'members' list")
    members = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"SecAgg+ roster {path}: member {i} is not a table")
        node_id = row.get("node-id")
        if node_id is not None and (not isinstance(node_id, int) or isinstance(node_id, bool)):
            raise ValueError(f"SecAgg+ roster {path}: member {i} has a non-integer node-id")
        members.append(RosterMember(
            _hex_bytes(row.get("signing-key"), 32, f"roster member {i} signing-key"),
            str(row.get("name", "")), node_id,
        ))
    roster = Roster(tuple(members))
    if admin_key is not None:
        if "signature" not in data:
            raise ValueError(
                f"SecAgg+ roster {path} is not signed, but node config sets "
                f"{NODE_ROSTER_ADMIN_KEY}: sign it with the administrator key"
            )
        signature = _hex_bytes(data["signature"], 64, "roster signature")
        try:
            crypto.verify(admin_key, roster.signed_payload(), signature)
        except crypto.CryptoError:
            raise ValueError(
                f"SecAgg+ roster {path}: the administrator signature does not verify "
                "(the file was altered or signed with another key)"
            ) from None
    return roster


@dataclass(frozen=True)
class SecAggPolicy:
    """What this client accepts in a SecAgg+ round, whatever the server says.

    Attributes:
        min_cohort: smallest cohort n (default 3: with 2 the sum reveals the peer's
            input); the cohort must also hold :attr:`min_sum` members.
        min_num_shares: smallest k.
        min_reconstruction_threshold: smallest t.
        corrupt_fraction: gamma, the fraction of the *federation* (the roster) that may
            collude with the server: C = ceil(gamma x roster size) unless
            ``max_colluders`` is set. Never applied to the cohort.
        max_colluders: C, the absolute number of federation members that may collude
            with the server (``None``: ``ceil(corrupt_fraction x roster size)``; without
            a roster unknown, see the module docstring).
        min_honest_others: h, the fewest honest inputs besides this client's own that
            every sum it joins must hold beyond the C colluders (``None``: 2 when C is
            known, 1 without a roster and without ``max_colluders``).
        dropout_fraction: delta, the dropouts the deployment plans for (informative
            for the client: a round that loses more aborts, which releases nothing).
        security_bits: sigma, see :func:`~flwr_guard.secagg.params.tolerated_corrupt_neighbours`.
        roster: the federation roster; ``None``: none (then ``trust_on_first_use``
            must be on, else every round is refused).
        trust_on_first_use: accept unknown signing keys and pin them (opt in; no
            protection against a Sybil cohort).
        max_cohort, max_vector_length: bounds on what a message may make this client
            allocate (ids, vector length).
        max_session_rounds: most rounds a multi-round session may span (from its
            set-up's round, inclusive); later inputs are refused with a re-key request.
        max_session_seconds: most wall-clock seconds from a session's opening on this
            client to an input; later inputs are refused with a re-key request.

    Raises (constructor):
        ValueError: a value outside its range.
    """

    min_cohort: int = 3
    min_num_shares: int = 2
    min_reconstruction_threshold: int = 2
    corrupt_fraction: float = DEFAULT_CORRUPT_FRACTION
    dropout_fraction: float = DEFAULT_DROPOUT_FRACTION
    security_bits: int = DEFAULT_SECURITY_BITS
    roster: Roster | None = None
    trust_on_first_use: bool = False
    max_cohort: int = 100_000
    max_vector_length: int = 2**28
    max_colluders: int | None = None
    min_honest_others: int | None = None
    max_session_rounds: int = DEFAULT_MAX_SESSION_ROUNDS
    max_session_seconds: float = DEFAULT_MAX_SESSION_SECONDS

    def __post_init__(self) -> None:
        if self.min_cohort < 2:
            raise ValueError(f"min_cohort must be >= 2, got {self.min_cohort}")
        if not 0 <= self.corrupt_fraction < 1 or not 0 <= self.dropout_fraction < 1:
            raise ValueError("corrupt_fraction and dropout_fraction must be in [0, 1)")
        if not 1 <= self.security_bits <= 256:
            raise ValueError(f"security_bits must be in [1, 256], got {self.security_bits}")
        if self.max_colluders is not None and self.max_colluders < 0:
            raise ValueError(f"max_colluders must be >= 0, got {self.max_colluders}")
        if self.min_honest_others is not None and self.min_honest_others < 1:
            raise ValueError(
                f"min_honest_others must be >= 1, got {self.min_honest_others}: with none, "
                "the server and the colluders read this client's input off the sum"
            )
        if not 1 <= self.max_session_rounds <= MAX_SESSION_ROUNDS_LIMIT:
            raise ValueError(
                f"max_session_rounds must be in [1, {MAX_SESSION_ROUNDS_LIMIT}], got {self.max_session_rounds}"
            )
        if not (math.isfinite(self.max_session_seconds) and self.max_session_seconds > 0):
            raise ValueError(f"max_session_seconds must be finite and > 0, got {self.max_session_seconds}")

    @property
    def colluders(self) -> int | None:
        """C: the federation members that may collude with the server (see the class);
        ``None`` without a roster and without ``max_colluders``."""
        if self.max_colluders is not None:
            return self.max_colluders
        if self.roster is not None:
            return colluders_for(len(self.roster.members), self.corrupt_fraction)
        return None

    def threshold_colluders(self, cohort_size: int) -> int:
        """The C that the t check uses for a cohort of ``cohort_size``: :attr:`colluders`,
        or without one ``floor(gamma n)`` (trust on first use: the cohort is the only size
        this client knows, and no bound holds against Sybils; the rule before the
        absolute bound, unchanged)."""
        c = self.colluders
        if c is not None:
            return c
        return math.floor(Fraction(repr(float(self.corrupt_fraction))) * cohort_size)

    @property
    def honest_others(self) -> int:
        """h: :attr:`min_honest_others`, else 2 when C is known and 1 when it is not."""
        if self.min_honest_others is not None:
            return self.min_honest_others
        return DEFAULT_MIN_HONEST_OTHERS if self.colluders is not None else 1

    def colluders_source(self) -> str:
        """Where C comes from, for messages."""
        if self.max_colluders is not None:
            return f"{NODE_MAX_COLLUDERS}={self.max_colluders}"
        if self.roster is not None:
            return (f"ceil({NODE_CORRUPT_FRACTION} {self.corrupt_fraction} x roster of "
                    f"{len(self.roster.members)})")
        return f"floor({NODE_CORRUPT_FRACTION} {self.corrupt_fraction} x cohort): no roster"

    @property
    def min_sum(self) -> int:
        """The fewest inputs of a sum this client joins: ``max(min_cohort, C + 1 + h)``."""
        return max(self.min_cohort, min_sum_size(self.colluders or 0, self.honest_others))

    def check_sum_size(self, size: int, what: str) -> None:
        """Refuse a cohort or survivor set of ``size`` below :attr:`min_sum`.

        Raises:
            PolicyViolation: naming C, h, where C comes from and the keys that set them.
        """
        if size >= self.min_sum:
            return
        c, h = self.colluders or 0, self.honest_others
        if c + 1 + h > self.min_cohort:
            why = (
                f"with up to C = {c} colluding members ({self.colluders_source()}) a sum must "
                f"hold C + 1 + {h} = {c + 1 + h} inputs, so that this client's input is summed "
                f"with at least {h} honest others ({NODE_MIN_HONEST_OTHERS})"
            )
        else:
            why = f"this client's policy needs at least {self.min_cohort} ({NODE_MIN_COHORT})"
        raise PolicyViolation(f"{what} of {size}: {why}")

    def check_context(self, context: RoundContext) -> None:
        """Refuse a round whose cohort or (k, t) is below this policy.

        Raises:
            PolicyViolation: naming the field, the server's value and the policy's.
        """
        n, params = len(context.cohort), context.params
        k, t = params.num_shares, params.reconstruction_threshold
        if n > self.max_cohort:
            raise PolicyViolation(f"cohort of {n} exceeds this client's max_cohort {self.max_cohort}")
        if context.vector_length > self.max_vector_length:
            raise PolicyViolation(
                f"vector length {context.vector_length} exceeds max_vector_length {self.max_vector_length}"
            )
        self.check_sum_size(n, "the server announced a cohort")
        if not 1 <= k <= n - 1:
            raise PolicyViolation(f"num_shares {k} is outside [1, n - 1 = {n - 1}]")
        if k < min(self.min_num_shares, n - 1):
            raise PolicyViolation(
                f"the server asks for num_shares {k}, this client's policy needs at least "
                f"{self.min_num_shares} ({NODE_MIN_NUM_SHARES})"
            )
        if t < min(self.min_reconstruction_threshold, k):  # (k = 1 only for a cohort of 2)
            raise PolicyViolation(
                f"the server asks for reconstruction_threshold {t}, this client's policy "
                f"needs at least {self.min_reconstruction_threshold} ({NODE_MIN_THRESHOLD})"
            )
        # Odd k over odd n gives some clients k + 1 neighbours (and share holders).
        degree = max_degree(n, k)
        colluders = self.threshold_colluders(n)
        c = tolerated_corrupt_neighbours(
            n, degree, self.corrupt_fraction, self.security_bits, colluders
        )
        needed = minimum_threshold(degree, c)
        if t < needed or t > k:
            raise PolicyViolation(
                f"the server asks for reconstruction_threshold {t} with num_shares {k} in a "
                f"cohort of {n}; with up to C = {colluders} colluding members "
                f"({self.colluders_source()}) and 2^-{self.security_bits} this client "
                f"tolerates c = {c} corrupt neighbours and needs 2t > k + c"
                f"{' (k + 1 neighbours for odd k and n)' if degree != k else ''}, "
                f"i.e. t >= {needed} (and t <= k)"
            )
        self.check_sparse_split(n, k, t, degree, c)

    def check_sparse_split(self, n: int, k: int, t: int, degree: int, c: int) -> None:
        """Refuse a sparse graph whose t lets a split survivor set hold fewer than h
        honest others.

        With a sparse graph the sum floor on the signed survivor set is not enough: a
        server that drops the honest neighbours of a small set S after their masked
        inputs can unmask S's sum alone while U3 stays large. Each member of S needs t
        live neighbours in S, at most c of them colluders, so S holds at least t - c + 1
        honest inputs: t - c >= h keeps h honest others besides this client's own. A
        cohort no larger than the sum floor is exempt: no member can be dropped without
        U3 falling below the floor, and the whole cohort's graph is connected.

        Raises:
            PolicyViolation: naming t, c, h and the two ways out.
        """
        h = self.honest_others
        if degree < n - 1 and n > self.min_sum and t - c < h:
            raise PolicyViolation(
                f"the server asks for reconstruction_threshold {t} with num_shares {k} in a "
                f"cohort of {n}: with a sparse graph a survivor set can be split so that a sum "
                f"holds only t - c + 1 = {t - c + 1} honest inputs, and this client needs "
                f"h = {h} honest others ({NODE_MIN_HONEST_OTHERS}): t >= {c + h}, or the "
                f"complete graph (num_shares = n - 1 = {n - 1})"
            )

    def check_member(self, node_id: int, signing_key: bytes, pinned: Mapping[int, bytes]) -> None:
        """Accept ``node_id`` signing with ``signing_key``, or raise.

        With a roster: the key must be on it (and the id, when the roster names one).
        Without: a pinned key must not have changed, and trust on first use must be on.

        Raises:
            PolicyViolation: naming the node and why.
        """
        if self.roster is not None:
            member = self.roster.member(signing_key)
            if member is None:
                raise PolicyViolation(
                    f"node {node_id} signs with a key that is not on the federation roster "
                    "(a Sybil or an unknown client): refusing the round"
                )
            if member.node_id is not None and member.node_id != node_id:
                raise PolicyViolation(
                    f"node {node_id} uses the key of roster member {member.name or member.node_id!r}, "
                    f"which the roster binds to node id {member.node_id}"
                )
            return
        expected = pinned.get(node_id)
        if expected is not None and expected != signing_key:
            raise PolicyViolation(f"node {node_id} signs with another key than the one pinned before")
        if not self.trust_on_first_use:
            raise PolicyViolation(self.no_roster_message())

    def no_roster_message(self) -> str:
        return (
            f"SecAgg+ has no federation roster: set node config {NODE_ROSTER}=<file> "
            f"(docs/secagg.md), or opt in with {NODE_TOFU}=true to trust keys on first use "
            "(no protection against a server that fills the cohort with its own clients)"
        )


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if isinstance(value, int):
        return bool(value)
    raise ValueError(f"node config {key} must be true or false, got {value!r}")


def policy_from_node_config(node_config: Mapping[str, Any], simulation: bool = False) -> SecAggPolicy:
    """Build the policy from a SuperNode's node config (keys: the ``NODE_*`` constants
    of this module, documented in docs/secagg.md).

    Args:
        simulation: Flower's simulation runtime (one process tree, one operator, no
            one to defend against): trust on first use is then the default, the
            smallest cohort is 2 (3 otherwise).

    Raises:
        ValueError: a value of the wrong type or range, an unreadable or badly signed roster.
    """
    roster = None
    admin = node_config.get(NODE_ROSTER_ADMIN_KEY)
    if node_config.get(NODE_ROSTER):
        roster = load_roster(
            str(node_config[NODE_ROSTER]),
            _hex_bytes(admin, 32, NODE_ROSTER_ADMIN_KEY) if admin else None,
        )
    elif admin:
        raise ValueError(f"node config sets {NODE_ROSTER_ADMIN_KEY} but no {NODE_ROSTER}")
    tofu = _bool(node_config.get(NODE_TOFU, simulation), NODE_TOFU)
    kwargs: dict[str, Any] = {}
    for key, name, kind in (
        (NODE_MIN_COHORT, "min_cohort", int),
        (NODE_MIN_NUM_SHARES, "min_num_shares", int),
        (NODE_MIN_THRESHOLD, "min_reconstruction_threshold", int),
        (NODE_SECURITY_BITS, "security_bits", int),
        (NODE_CORRUPT_FRACTION, "corrupt_fraction", float),
        (NODE_DROPOUT_FRACTION, "dropout_fraction", float),
        (NODE_MAX_COLLUDERS, "max_colluders", int),
        (NODE_MIN_HONEST_OTHERS, "min_honest_others", int),
        (NODE_MAX_SESSION_ROUNDS, "max_session_rounds", int),
        (NODE_MAX_SESSION_SECONDS, "max_session_seconds", float),
    ):
        if key in node_config:
            try:
                value = kind(node_config[key])
            except (TypeError, ValueError):
                raise ValueError(f"node config {key} must be a number, got {node_config[key]!r}") from None
            if kind is float and not math.isfinite(value):
                raise ValueError(f"node config {key} must be finite")
            kwargs[name] = value
    if simulation:
        kwargs.setdefault("min_cohort", 2)
    return SecAggPolicy(roster=roster, trust_on_first_use=tofu, **kwargs)

"""Flower façade for the client side: :class:`ClientGuard`.

One object declares what a ClientApp requires and builds the mods in the one valid
order::

    from flwr_guard.guard import ClientGuard, ClientPolicy

    guard = ClientGuard(ClientPolicy(secagg=True, dp="central", max_clipping_norm=1.0))

    @app.train(mods=guard.train_mods())
    def train(msg, context): ...

The mods, outermost first (a reply goes back through them innermost first)::

    policy_mod            refuses a server that asks for less than the policy; never
                          lets an update out unmasked when SecAgg+ is required
      secaggplus_mod      SecAgg+ (masks the update; answers the protocol stages)
        reply_inspection  blocks replies that carry more than the update
          leakage audit   attacks the update before it is masked (sampled)
            update clipping  clips the update to the server's clipping norm (user-level DP)

Under the node operator's guard (``flwr-guard node start``, :mod:`flwr_guard.node`) the
node's own mods run outside the app and mask its update; the guard tells the app's
process so (:mod:`flwr_guard.node.enforcement`, a marker no run config or message can
set), and this guard's policy mod then leaves SecAgg+ to the node instead of refusing a
train message that reaches the app without the protocol record. Everything else here
(the manifest and DP floors against this policy, DP-SGD, the audit, reply inspection)
runs as it does on a node without the guard.

The individual mods stay public (``flwr_guard.secagg.secaggplus_mod``, ...) for experts;
this class is the documented way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from flwr.app import Context
from flwr.clientapp.typing import Mod

from flwr_guard.guard.client_mod import confirm_dpsgd, policy_mod
from flwr_guard.guard.policy import ClientPolicy

if TYPE_CHECKING:
    import torch

    from flwr_guard.audit import LeakageAuditConfig
    from flwr_guard.dp.dpsgd import DPSGDConfig


@dataclass(frozen=True)
class LeakageAudit:
    """The client's leakage audit (:func:`flwr_guard.audit.leakage_audit_mod`).

    Attributes:
        model_fn: returns the model architecture (weights come from the train message).
        data_fn: ``data_fn(context) -> (images, labels)``, the client's own data as the
            model sees it: images ``(M, C, H, W)`` float, labels ``(M,)`` int.
        normalization: ``(mean, std)`` per channel when the model's inputs are normalised
            (torchvision's ``Normalize``; Flower's examples use ``((0.5,), (0.5,))``, i.e.
            pixels in ``[-1, 1]``); ``None`` when ``data_fn``'s images are in ``[0, 1]``.
            The audit attacks and scores pixels in ``[0, 1]``: the images are mapped back
            with ``x * std + mean`` and the model gets ``(x - mean) / std`` in front (a
            forward pre-hook: no parameter or state-dict key changes).
        config: sampling, plan, gate, device, ``on_failure``, ``modality``, dict-batch
            keys (:class:`LeakageAuditConfig`). With DP-SGD the guard turns
            ``check_update_norm`` off (the update is many clipped steps, not one update
            clipped to the norm).
        trap_check: the trap-model check before training
            (:class:`flwr_guard.audit.trap_check.TrapCheckConfig`; ``True``: defaults,
            ``False``: off). See docs/audit.md.
    """

    model_fn: Callable[[], Any]
    data_fn: Callable[[Context], Any]
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    config: LeakageAuditConfig | None = None
    trap_check: Any = True

    def __post_init__(self) -> None:
        """Checks that need no torch (the model and data are checked on the first train
        message, see :mod:`flwr_guard.audit.audit_mod`).

        Raises:
            TypeError: ``model_fn`` or ``data_fn`` not callable, ``model_fn`` a model
                instance instead of a builder, or ``trap_check`` not a
                bool, ``None`` or a ``TrapCheckConfig``.
        """
        for name in ("model_fn", "data_fn"):
            if not callable(getattr(self, name)):
                raise TypeError(f"LeakageAudit.{name} must be callable, got "
                                f"{type(getattr(self, name)).__name__}")
        if (not isinstance(self.model_fn, type) and hasattr(self.model_fn, "state_dict")
                and hasattr(self.model_fn, "parameters")):  # a class is a fine builder
            raise TypeError(
                f"LeakageAudit.model_fn must build the model (e.g. lambda: MyNet()), got a "
                f"{type(self.model_fn).__name__} instance: the audit loads each round's "
                "weights into a fresh one")
        if not (self.trap_check in (True, False, None)
                or type(self.trap_check).__name__ == "TrapCheckConfig"):
            raise TypeError("LeakageAudit.trap_check must be True, False or a TrapCheckConfig, "
                            f"got {type(self.trap_check).__name__}")

    def trap_mod(self) -> Mod | None:
        """The trap-model check mod, or ``None`` when off (imports torch: call it on a
        train message)."""
        if self.trap_check is False or self.trap_check is None:
            return None
        from flwr_guard.audit.audit_mod import LeakageAuditConfig
        from flwr_guard.audit.trap_check import TrapCheckConfig
        from flwr_guard.audit.trap_mod import trap_check_mod

        check = TrapCheckConfig() if self.trap_check is True else self.trap_check
        config = self.config or LeakageAuditConfig()
        model_fn, data_fn = self.model_fn, self.data_fn
        if self.normalization is not None:
            mean, std = self.normalization
            model_fn = _normalised_model(model_fn, mean, std)
            data_fn = _unit_range_data(data_fn, mean, std)
        return trap_check_mod(model_fn, data_fn, check, input_key=config.input_key,
                              target_key=config.target_key, modality=config.modality,
                              seed=config.seed)

    def mod(self, dpsgd: bool) -> Mod:
        """The audit mod for these settings (imports torch: call it on a train message)."""
        from dataclasses import replace

        from flwr_guard.audit.audit_mod import LeakageAuditConfig, leakage_audit_mod

        config = self.config or LeakageAuditConfig()
        if dpsgd and config.check_update_norm:
            config = replace(config, check_update_norm=False)
        if self.normalization is None:
            return leakage_audit_mod(self.model_fn, self.data_fn, config)
        mean, std = self.normalization
        return leakage_audit_mod(_normalised_model(self.model_fn, mean, std),
                                 _unit_range_data(self.data_fn, mean, std), config)


def _channel_view(values: tuple[float, ...]) -> Any:
    import torch

    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def _normalised_model(model_fn: Callable[[], Any], mean: tuple[float, ...], std: tuple[float, ...]
                      ) -> Callable[[], Any]:
    def build() -> Any:
        model = model_fn()
        m, s = _channel_view(mean), _channel_view(std)
        model.register_forward_pre_hook(
            lambda _module, args: ((args[0] - m.to(args[0])) / s.to(args[0]), *args[1:]))
        return model
    return build


def _unit_range_data(data_fn: Callable[[Context], tuple[Any, Any]], mean: tuple[float, ...],
                     std: tuple[float, ...]) -> Callable[[Context], tuple[Any, Any]]:
    def data(context: Context) -> tuple[Any, Any]:
        import torch

        images, labels = data_fn(context)
        x = torch.as_tensor(images, dtype=torch.float32)
        x = x if x.dim() == 4 else x.unsqueeze(1)
        return (x * _channel_view(std) + _channel_view(mean)).clamp(0.0, 1.0), labels
    return data


class PrivateRun:
    """What :meth:`ClientGuard.private_training` yields: Opacus' wrapped objects.

    Attributes:
        module, optimizer, criterion, data_loader: use these instead of the originals
            (see :class:`flwr_guard.dp.dpsgd.PrivateTraining`).
    """

    def __init__(self, private: Any, input_key: str | None, target_key: str | None,
                 epochs: int = 1) -> None:
        self.epochs = epochs
        self.module = private.module
        self.optimizer = private.optimizer
        self.criterion = private.criterion
        self.data_loader = private.data_loader
        self._keys = (input_key, target_key)
        self.epsilon: float | None = None

    def batches(self, device: torch.device | str | None = None) -> Iterator[tuple[Any, Any]]:
        """``(inputs, targets)`` of each Poisson-sampled batch, on ``device``.

        Works with ``(x, y)`` samples and with dict samples (Flower's examples:
        ``{"img": ..., "label": ...}``; name the keys in ``private_training``, which then
        hands Opacus ``(x, y)`` pairs). Empty Poisson batches are yielded too, with the
        inputs' shape: DP-SGD takes its noisy step on them as on any other, so that the
        number of steps does not depend on the data (Abadi et al. 2016, Algorithm 1).

        Raises:
            KeyError: a dict batch without the named keys.
            TypeError: a batch that is neither a pair nor a dict.
        """
        input_key, target_key = self._keys
        for batch in self.data_loader:
            if isinstance(batch, dict):
                if input_key is None or target_key is None:
                    raise KeyError(
                        "the data loader yields dict batches: name their keys, e.g. "
                        "private_training(..., input_key='img', target_key='label')"
                    )
                x, y = batch[input_key], batch[target_key]
            elif isinstance(batch, (tuple, list)) and len(batch) == 2:
                x, y = batch
            else:
                raise TypeError(
                    f"a batch must be (inputs, targets) or a dict, got {type(batch).__name__}"
                )
            if device is not None:
                x, y = x.to(device), y.to(device)
            yield x, y

    def fit(self, device: torch.device | str | None = None) -> float:
        """The plain DP-SGD loop: the round's epochs of zero_grad, loss, backward, step.

        Returns:
            The last epoch's mean loss over its examples (``nan`` if it drew none).
        """
        total, count = 0.0, 0
        self.module.train()
        for _ in range(self.epochs):
            total, count = 0.0, 0
            for x, y in self.batches(device):
                self.optimizer.zero_grad()
                loss = self.criterion(self.module(x), y)
                loss.backward()
                self.optimizer.step()
                if len(y):
                    total += float(loss.item()) * len(y)
                    count += len(y)
        return total / count if count else float("nan")


class ClientGuard:
    """The client's protections, declared once (see the module docstring).

    Args:
        policy: what this client requires of the server (:class:`ClientPolicy`).
        dpsgd: record-level DP-SGD for :meth:`private_training`; with it, the policy
            also requires that every update was trained under DP-SGD.
        audit: the leakage audit (:class:`LeakageAudit`, or an audit mod of your own
            such as one configured per message from the run config), or ``None``.
        inspect_replies: run the reply inspector (block replies that carry more than
            the update).

    The update is clipped whenever the server's train config sets a clipping norm (the
    server's DP accounting assumes it), whatever this client's policy.

    Raises:
        ValueError: a policy that requires DP-SGD without ``dpsgd``, or a DP-SGD noise
            multiplier that is not > 0.
    """

    def __init__(
        self,
        policy: ClientPolicy | None = None,
        *,
        dpsgd: DPSGDConfig | None = None,
        audit: LeakageAudit | Mod | None = None,
        inspect_replies: bool = True,
    ) -> None:
        policy = policy or ClientPolicy()
        if dpsgd is not None and not dpsgd.noise_multiplier > 0:  # DPSGDConfig allows 0
            raise ValueError(
                f"DP-SGD needs a noise multiplier > 0, got {dpsgd.noise_multiplier}: without "
                "noise, clipping alone gives no differential privacy"
            )
        if dpsgd is not None and not policy.dpsgd:
            policy = ClientPolicy(**{**vars(policy), "dpsgd": True})
        if policy.dpsgd and dpsgd is None:
            raise ValueError("the policy requires DP-SGD: pass dpsgd=DPSGDConfig(...)")
        self.policy = policy
        self.dpsgd = dpsgd
        self.audit = audit
        self.inspect_replies = inspect_replies

    def train_mods(self) -> list[Mod]:
        """The train mods in the one valid order, for ``@app.train(mods=...)``."""
        from flwr_guard.dp.mods import update_clipping_mod
        from flwr_guard.secagg.mod import secaggplus_mod

        mods: list[Mod] = [policy_mod(self.policy), secaggplus_mod]
        if isinstance(self.audit, LeakageAudit) and self.audit.trap_check not in (False, None):
            mods.append(_lazy_trap_mod(self.audit))
        if self.inspect_replies:
            from flwr_guard.inspection.reply_mod import reply_inspection_mod

            mods.append(reply_inspection_mod())
        if isinstance(self.audit, LeakageAudit):
            mods.append(_lazy_audit_mod(self.audit, dpsgd=self.dpsgd is not None))
        elif self.audit is not None:
            mods.append(self.audit)
        mods.append(update_clipping_mod if self.policy.dp is not None else _clip_when_announced)
        return mods

    def protections(self) -> Sequence[str]:
        """Names of the protections this client runs (for logs and metrics)."""
        names = list(self.policy.required())
        if self.inspect_replies:
            names.append("reply-inspection")
        if self.audit is not None:
            names.append("leakage-audit")
        return names

    @contextmanager
    def private_training(
        self,
        context: Context,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: Any,
        criterion: Any = None,
        *,
        epochs: int,
        input_key: str | None = None,
        target_key: str | None = None,
    ) -> Iterator[PrivateRun]:
        """Train ``epochs`` epochs under DP-SGD inside a guarded train call.

        Before any data is touched, this config is bounded by the node's policy (budget
        cap, noise floor; library defaults without node config) and the node's durable
        record-level ledger is loaded (:func:`flwr_guard.dp.context_state.dpsgd_from_context`:
        node config ``dp-sgd-ledger``, ``dp-sgd-data-source``; created beforehand by
        ``flwr-guard ledger init``), the round's ``epochs * len(data_loader)`` steps are
        checked against ``max_epsilon`` and reserved. On a clean exit the ledger is
        finished, ``run.epsilon`` is set, and the policy mod is told that this update
        was trained privately (without that, a policy that requires DP-SGD refuses to
        send it).

        Args:
            context: the ClientApp's context.
            model: moved to its device before ``optimizer`` was built.
            optimizer, data_loader, criterion: as for :meth:`flwr_guard.dp.dpsgd.DPSGD.make_private`.
            epochs: local epochs of the round (what :meth:`PrivateRun.fit` runs).
            input_key, target_key: the keys of dict samples (see :meth:`PrivateRun.batches`).

        Raises:
            PrivacyBudgetExceeded: the round would exceed ``max_epsilon`` (nothing trained).
            LedgerMissing: the node's ledger is missing or corrupt (names the command).
            ValueError: the config asks for less noise than the node's floor.
            RuntimeError: without a :class:`DPSGDConfig`, outside the guard's mods, or
                when no DP-SGD step was taken inside the block.
        """
        if self.dpsgd is None:
            raise RuntimeError("private_training needs ClientGuard(dpsgd=DPSGDConfig(...))")
        from flwr_guard.dp.context_state import dpsgd_from_context, save_dpsgd

        dpsgd = dpsgd_from_context(context, self.dpsgd, epochs=int(epochs))
        if input_key is not None or target_key is not None:
            data_loader = _pairs(data_loader, input_key, target_key)
        run = PrivateRun(dpsgd.make_private(model, optimizer, data_loader, criterion),
                         input_key, target_key, epochs=int(epochs))
        yield run
        if dpsgd.realised_steps == 0:
            raise RuntimeError(
                "no DP-SGD step was taken inside private_training: train with the yielded "
                "optimizer (run.optimizer.step()) or run.fit(...); the update is not sent"
            )
        run.epsilon = save_dpsgd(context, dpsgd)
        confirm_dpsgd(context)


class _Pairs:
    """A dataset of dict samples seen as ``(input, target)`` tensor pairs (what Opacus'
    Poisson loader needs to build empty batches of the right shape)."""

    def __init__(self, dataset: Any, input_key: str, target_key: str) -> None:
        self.dataset, self.keys = dataset, (input_key, target_key)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        import torch

        sample = self.dataset[index]
        try:
            return (torch.as_tensor(sample[self.keys[0]]), torch.as_tensor(sample[self.keys[1]]))
        except (KeyError, TypeError, IndexError):
            raise KeyError(f"a sample lacks the keys {self.keys}: name the keys of your dict "
                           "samples in private_training(input_key=..., target_key=...)") from None


def _pairs(loader: Any, input_key: str | None, target_key: str | None) -> Any:
    from torch.utils.data import DataLoader, Dataset

    if input_key is None or target_key is None:
        raise ValueError("name both input_key and target_key (the keys of your dict samples)")
    # _Pairs is a map-style dataset (__getitem__ and __len__), all DataLoader needs.
    pairs = cast(Dataset[Any], _Pairs(loader.dataset, input_key, target_key))
    return DataLoader(pairs, batch_size=loader.batch_size, num_workers=loader.num_workers)


def _clip_when_announced(msg: Any, context: Context, call_next: Any) -> Any:
    """Clip the update whenever the server's train config sets a clipping norm, whether or
    not this client's policy requires DP: the server's accounting assumes it."""
    from flwr_guard.dp.mods import update_clipping_mod
    from flwr_guard.keys import TrainConfig

    config = msg.content.config_records.get("config")
    if config is not None and TrainConfig.DP_CLIPPING_NORM in config:
        return update_clipping_mod(msg, context, call_next)
    return call_next(msg, context)


def _lazy_trap_mod(audit: LeakageAudit) -> Mod:
    built: list[Mod] = []

    def mod(msg: Any, context: Context, call_next: Any) -> Any:
        if not msg.content.array_records:  # a SecAgg+ control stage: no model
            return call_next(msg, context)
        if not built:
            trap = audit.trap_mod()
            built.append(trap if trap is not None else (lambda m, c, n: n(m, c)))
        return built[0](msg, context, call_next)

    return mod


def _lazy_audit_mod(audit: LeakageAudit, dpsgd: bool) -> Mod:
    # The audit pulls in torch and torchmetrics (seconds): import it on a train message,
    # not in a ClientApp process that only answers a SecAgg+ stage.
    built: list[Mod] = []

    def mod(msg: Any, context: Context, call_next: Any) -> Any:
        if not built:
            built.append(audit.mod(dpsgd))
        return built[0](msg, context, call_next)

    return mod

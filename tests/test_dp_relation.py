"""Distributed DP's neighbouring relation (add/remove of a client whose noise share
leaves with it vs zero-out) and flwr-guard's accounting against Flower's own types and
accountant (flwr.serverapp.PrivacyConfig / PrivacySpent, RdpAccountant)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.serverapp import NeighboringRelation, PrivacyConfig, PrivacySpent, SamplingMethod
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant as FlowerRdp
from scipy import integrate, stats

from flwr_guard.dp.accounting import Step, StepLedger, compute_epsilon, epsilon_of_steps
from flwr_guard.dp.distributed import quantised_l2_bound, skellam_mu
from flwr_guard.dp.relation_accounting import (
    ADD_REMOVE_ORDERS,
    add_remove_rdp,
    gaussian_pair_rdp,
)
from flwr_guard.dp.skellam_accounting import epsilon_from_rdp, quantised_l1_bound
from flwr_guard.dp.strategy import DPFedAvg

DELTA = 1e-5


def _add_remove_epsilon(z: float, cohort: int, rounds: int, dim: int = 1) -> float:
    """n = m = cohort clients, each adding 1/n of the variance z^2 (sensitivity 1)."""
    rdp = rounds * add_remove_rdp(ADD_REMOVE_ORDERS, 1.0, z**2 / cohort, cohort, dim)
    return epsilon_from_rdp(ADD_REMOVE_ORDERS, rdp, DELTA)


@pytest.mark.parametrize(("cohort", "rounds", "zero_out", "add_remove"),
                         [(4, 2, 5.72, 11.35), (10, 25, 27.4, 31.8)])
def test_the_issues_reference_values_gaussian_analogue_d_1(cohort, rounds, zero_out,
                                                          add_remove) -> None:
    # z = 1.2, delta = 1e-5 reproduce the issue's closed-form numbers.
    assert compute_epsilon(1.2, 1.0, rounds, DELTA, sampling="none") == pytest.approx(
        zero_out, abs=0.01 * zero_out)
    assert _add_remove_epsilon(1.2, cohort, rounds) == pytest.approx(add_remove, abs=0.01 * add_remove)


def test_the_closed_form_matches_mironov_and_a_numerical_integral() -> None:
    # Equal variances: the Gaussian mechanism's a * shift^2 / (2 sigma^2) (Mironov 2017, Prop. 7).
    assert gaussian_pair_rdp(3.0, 1.0, 2.0, 2.0, 1) == pytest.approx(3.0 / 4.0, rel=1e-12)
    # Unequal variances, d = 1: against quadrature of the definition
    # D_a(P||Q) = log(int p^a q^(1-a)) / (a - 1).
    for order, v0, v1 in ((1.5, 1.0, 0.75), (3.0, 0.75, 1.0), (2.0, 1.44, 1.08)):
        p, q = stats.norm(0.0, math.sqrt(v0)), stats.norm(1.0, math.sqrt(v1))
        value, _ = integrate.quad(
            lambda x, p=p, q=q, a=order: math.exp(a * p.logpdf(x) + (1 - a) * q.logpdf(x)),
            -30, 30, limit=200)
        assert gaussian_pair_rdp(order, 1.0, v0, v1, 1) == pytest.approx(
            math.log(value) / (order - 1), rel=1e-7)
    # Removing one of n shares: no finite divergence at order >= n.
    assert gaussian_pair_rdp(4.0, 1.0, 1.0, 0.75, 1) == math.inf


def test_add_remove_costs_more_and_grows_with_the_dimension() -> None:
    d1, d100 = _add_remove_epsilon(1.2, 10, 1), _add_remove_epsilon(1.2, 10, 1, dim=100)
    assert compute_epsilon(1.2, 1.0, 1, DELTA, sampling="none") < d1 < d100
    # One contributor: removing it removes all the noise: no guarantee.
    assert np.isinf(add_remove_rdp(ADD_REMOVE_ORDERS, 1.0, 1.0, 1, 1)).all()


def _distributed(relation: str, m: int = 2) -> DPFedAvg:
    return DPFedAvg(FedAvg(), noise_multiplier=1.0, clipping_norm=1.0, expected_contributors=3,
                    distributed=True, min_contributors=m, quantization_step=4 / 2**16,
                    relation=relation, checkpoint=None)


def test_dpfedavg_distributed_accounts_add_remove_by_default_and_names_the_relation() -> None:
    from flwr.app import Array, ArrayRecord

    arrays = ArrayRecord({"w": Array(np.zeros(10, np.float32))})
    step, m, n, d = 4 / 2**16, 2, 3, 10
    default, zero_out = _distributed("add-remove"), _distributed("zero-out")
    planned = default._planned_step(arrays, n)
    l2 = quantised_l2_bound(1.0, step, d)
    mu = n * skellam_mu(1.0, 1.0, step, d, m)
    assert planned[4] == pytest.approx((l2, quantised_l1_bound(l2, d), mu))
    assert planned[5] == (n, d) and zero_out._planned_step(arrays, n)[5] is None
    add_remove = epsilon_of_steps([Step(*planned[:4], skellam=planned[4],
                                            leaving_shares=planned[5])], DELTA, "rdp", "none")
    expected = epsilon_from_rdp(ADD_REMOVE_ORDERS, add_remove_rdp(ADD_REMOVE_ORDERS, l2, 2 * mu / n,
                                                                  n, d), DELTA)
    assert add_remove == pytest.approx(expected, rel=1e-9)
    zero = epsilon_of_steps([Step(*planned[:4], skellam=planned[4])], DELTA, "rdp", "none")
    assert zero < add_remove
    assert default.relation_text.startswith("add/remove one client")
    assert zero_out.relation_text.startswith("zero-out one client")
    assert "add/remove one client" in default.privacy_spent().accounting_method
    # The ledger round-trips the relation (DPFedAvg's checkpoint).
    ledger = StepLedger()
    ledger.add(*planned)
    assert StepLedger.from_dict(ledger.to_dict()).steps == ledger.steps
    with pytest.raises(ValueError, match="relation must be one of"):
        _distributed("replace")
    with pytest.raises(ValueError, match="zero-out' is for distributed DP"):
        DPFedAvg(FedAvg(), noise_multiplier=1.0, clipping_norm=1.0, expected_contributors=3,
                 relation="zero-out", checkpoint=None)


@pytest.mark.parametrize(("sampling", "method"), [("none", SamplingMethod.NO_AMPLIFICATION),
                                                   ("poisson", SamplingMethod.POISSON)])
def test_gaussian_accounting_equals_flowers_accountant(sampling, method) -> None:
    """The same events (z per round, 10 of 100 clients) through Flower 1.41's RDP
    accountant (flwr.supercore.privacy_accounting) and through flwr-guard's."""
    rounds = [(1.1, 20), (0.9, 5), (1.5, 12)]
    config = PrivacyConfig(target_delta=DELTA, population_size=100,
                           neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                           sampling_method=method)
    flower = FlowerRdp(config)
    for z, count in rounds:
        flower.compose(GaussianPrivacyEvent(z, 10, 100), count)
    ours = epsilon_of_steps([Step(z, 0.1, count) for z, count in rounds], DELTA, "rdp", sampling)
    assert ours == pytest.approx(flower.get_epsilon(DELTA), rel=1e-12)
    # DPFedAvg reports through Flower's types.
    dp = DPFedAvg(FedAvg(), noise_multiplier=1.1, clipping_norm=1.0, expected_contributors=10,
                  sampling=sampling, checkpoint=None,
                  **({"sample_rate": 0.1, "population": 100} if sampling == "poisson" else
                     {"population": 100}))
    # Without amplification the population is not an input (the cohort is reported).
    population = 100 if sampling == "poisson" else 10
    assert dp.privacy_config() == PrivacyConfig(DELTA, population,
                                                NeighboringRelation.ADD_OR_REMOVE_ONE, method, None)
    dp.budget.ledger.add(1.1, dp.sample_rate, 20, dp.population)
    single = FlowerRdp(config)
    single.compose(GaussianPrivacyEvent(1.1, 10, 100), 20)
    spent = dp.privacy_spent()
    assert isinstance(spent, PrivacySpent) and spent.num_releases == 20 and spent.delta == DELTA
    assert spent.epsilon == pytest.approx(single.get_privacy_spent().epsilon, rel=1e-12)


def test_fixed_size_equals_flowers_replace_one_event_at_half_the_noise_multiplier() -> None:
    """Flower's WITHOUT_REPLACEMENT / REPLACE_ONE event takes z relative to the replace-one
    sensitivity; a replaced client moves the clipped sum by 2C, so flwr-guard composes z / 2."""
    config = PrivacyConfig(DELTA, 100, NeighboringRelation.REPLACE_ONE,
                           SamplingMethod.WITHOUT_REPLACEMENT)
    flower = FlowerRdp(config)
    flower.compose(GaussianPrivacyEvent(1.2 / 2, 10, 100), 30)
    ours = epsilon_of_steps([Step(1.2, 0.1, 30, population=100)], DELTA, "rdp", "fixed-size")
    assert ours == pytest.approx(flower.get_epsilon(DELTA), rel=1e-12)
    naive = FlowerRdp(config)
    naive.compose(GaussianPrivacyEvent(1.2, 10, 100), 30)
    assert naive.get_epsilon(DELTA) < ours  # z against C alone under-counts replace-one


def test_cli_prints_both_relations_and_creates_ledgers_once(tmp_path) -> None:
    from typer.testing import CliRunner

    from flwr_guard.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["epsilon", "--noise-multiplier", "1.2", "--sample-rate", "1",
                              "--rounds", "2", "--contributors", "4"])
    assert out.exit_code == 0, out.output
    assert "epsilon = 11.3576  (add/remove one client, its noise share leaves" in out.output
    assert "epsilon = 5.7166  (zero-out one client, its noise share stays" in out.output
    args = ["ledger", "init", "--dir", str(tmp_path), "--source", "partition-0"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0 and (tmp_path / "partition-0.json").exists()
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "exists: it keeps the epsilon already spent" in again.output
    shown = runner.invoke(app, ["ledger", "show", "--dir", str(tmp_path), "--source", "partition-0"])
    assert shown.exit_code == 0 and "0 DP-SGD steps, epsilon 0.0000" in shown.output
    bad = runner.invoke(app, ["ledger", "init", "--dir", str(tmp_path), "--source", "../etc"])
    assert bad.exit_code == 2 and "dp-sgd-data-source must be" in bad.output

"""The fair-share prototype in virtual time (loadtest/fairness_model.py): issue 22's scenarios, shortened.

The model is deterministic (seeded, no CPU in the loop), so its figures are properties to assert, not
timings: today's FIFO fails scenario (i), the chosen design (tickets, requests held at the gateway and
picked by virtual token counter when a worker claims one) passes (i)-(iv).
"""

from __future__ import annotations

import argparse

import pytest

from llmdispatch.loadtest import fairness_model as fm


@pytest.fixture(scope="module")
def args() -> argparse.Namespace:
    return fm.parse_args(["--duration-i", "30", "--duration-ii", "30", "--idle", "120", "--sync", "0.1"])


def light_ratio(candidate: str, args: argparse.Namespace) -> tuple[float, dict[str, float]]:
    """B's TTFT p50 with A's 30 streams over the same with A's 3, and the heavy run's figures."""
    alone = fm.heavy_and_light(candidate, args, 3)
    heavy = fm.heavy_and_light(candidate, args, 30)
    return heavy["b_ttft_p50"] / alone["b_ttft_p50"], heavy


def test_fifo_lets_a_heavy_tenant_reach_a_light_one(args: argparse.Namespace) -> None:
    ratio, heavy = light_ratio("fifo", args)
    assert ratio > 10  # issue 22 measured 45x by hand; the target is 1.5x
    assert heavy["b_done"] == heavy["b_sent"]


def test_ticket_keeps_the_light_tenant_within_target(args: argparse.Namespace) -> None:
    ratio, heavy = light_ratio("ticket", args)
    fifo = fm.heavy_and_light("fifo", args, 30)
    assert ratio <= 1.5
    assert heavy["b_done"] == heavy["b_sent"]  # B's throughput is its demand
    # Work-conserving: slots idle while A waits no more than today's (the hops between two requests).
    assert heavy["idle_while_a_waits"] <= fifo["idle_while_a_waits"] + 0.01


def test_ticket_shares_by_weight(args: argparse.Namespace) -> None:
    fifo = fm.shares("fifo", args)
    ticket = fm.shares("ticket", args)
    assert fifo["jain"] < 0.8  # FIFO shares by requests, whatever their lengths and the weights
    assert ticket["jain"] >= 0.95
    assert ticket["max_service_share_error"] <= 0.10
    assert ticket["max_share_error"] <= 0.10
    assert ticket["max_service_diff"] <= ticket["vtc_bound"]
    assert ticket["tokens_per_s"] >= 0.95 * fifo["tokens_per_s"]


def test_ticket_lift_prevents_a_burst_after_idle(args: argparse.Namespace) -> None:
    assert fm.comeback("ticket", args)["c_share_first_10s"] <= 0.4  # one of three: a fair third
    no_lift = argparse.Namespace(**{**vars(args), "lift": False})
    assert fm.comeback("ticket", no_lift)["c_share_first_10s"] >= 0.8  # why the lift exists


def test_ticket_across_two_gateways_and_workers(args: argparse.Namespace) -> None:
    # Two tenants on one gateway, eight on the other: the claim forwarding keeps the share per tenant.
    result = fm.shares("ticket", args, gateways=2, workers=2, split=2)
    assert result["jain"] >= 0.95
    assert result["max_service_share_error"] <= 0.10
    assert fm.shares("gate", args, gateways=2, workers=2, split=2)["jain"] < 0.9  # per-gateway windows do not

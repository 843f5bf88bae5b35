"""The schedules in virtual time (bench/sim_schedules.py): the engine's step plan under a
GPU cost model, against request-level batching, on the same arrivals."""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

from bench import sim_schedules as sim
from riffusion.emulation import PROFILES, Cost

H100 = sim.DeviceCosts.of(PROFILES["h100"])
CLIP_STEPS = 37  # the web app's: 50 steps at denoising 0.75


@pytest.mark.parametrize("schedule", sim.SCHEDULES)
def test_a_lone_clip_takes_its_device_time_and_nothing_more(schedule: str) -> None:
    [clip] = sim.run_schedule(schedule, [2.0], H100, CLIP_STEPS, slots=8)
    encode, decode, vocode = 0.001 + 0.00925, 0.001 + 0.0185, 0.001 + 0.006
    alone = encode + CLIP_STEPS * (0.0034 + 2 * 0.00403) + decode + vocode
    assert clip.answered - clip.arrived == pytest.approx(alone)


def test_past_capacity_the_engine_keeps_batching_and_its_throughput() -> None:
    # 90 % of the cost model's capacity: a step plan that parked newcomers to keep the
    # running clips on time stepped one or two clips at a time, gave up the batch's
    # saving and let the queue grow (p95 36 s over 20 minutes against adaptive's 5.7 s).
    rate = 0.9 * sim.capacity_of(H100, CLIP_STEPS, 8)
    arrivals = sim.poisson(rate, 300.0, seed=0)
    continuous = sim.summarise("continuous", 0.9, rate, [sim.continuous(arrivals, H100, 37, 8)])
    adaptive = sim.summarise("adaptive", 0.9, rate, [sim.adaptive(arrivals, H100, 37, 8)])
    assert continuous.throughput_rps >= 0.97 * rate
    assert continuous.p95_s <= 1.1 * adaptive.p95_s


def test_where_a_batch_costs_what_one_clip_does_joining_mid_way_wins() -> None:
    # The regime the engine is built for: a newcomer joins the running batch instead of
    # waiting for it to end.
    flat = dataclasses.replace(H100, unet=Cost(0.0115, 0.0))
    arrivals = sim.poisson(0.8 * 2.36, 300.0, seed=1)
    continuous = sim.summarise("c", 0.8, 0, [sim.continuous(arrivals, flat, CLIP_STEPS, 8)])
    adaptive = sim.summarise("a", 0.8, 0, [sim.adaptive(arrivals, flat, CLIP_STEPS, 8)])
    assert continuous.p95_s < 0.7 * adaptive.p95_s


def test_bentomls_cork_holds_a_lone_request_while_batches_waited_longer_on_average() -> None:
    cork = sim.Cork(max_latency_s=600.0)
    cork.a, cork.mean_wait = 0.3, 1.0
    # One request, queued at 10 s: held until 1 x (wn + 0.001 + 0.3) > 0.95 s.
    assert cork.release_at([10.0], 10.0, slots=8) == pytest.approx(10.0 + 0.95 - 0.3)
    # Two: until 2 x (wn + 0.001 + 0.3) > 0.95 s, from the newer one's arrival.
    assert cork.release_at([10.0, 10.1], 10.1, slots=8) == pytest.approx(10.1 + 0.475 - 0.3)
    assert cork.release_at([10.0] * 8, 10.0, slots=8) == 10.0  # a full batch goes at once
    cork.mean_wait = 0.0
    assert cork.release_at([10.0], 10.5, slots=8) == 10.5  # no hold: it goes when asked


def test_the_command_reports_each_schedule_and_refuses_unknown_ones() -> None:
    runner = CliRunner()
    result = runner.invoke(
        sim.main, ["--loads", "0.5", "--seconds", "60", "--seeds", "1", "--unet", "3.4,4.03"]
    )
    assert result.exit_code == 0, result.output
    assert "continuous p95 / adaptive p95" in result.output
    result = runner.invoke(sim.main, ["--schedules", "continuous,fifo"])
    assert result.exit_code != 0 and "fifo" in result.output
    result = runner.invoke(sim.main, ["--unet", "fast"])
    assert result.exit_code != 0 and "FIXED_MS,PER_SAMPLE_MS" in result.output

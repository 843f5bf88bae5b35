"""The listener's jam walk and playback clock: the web app's alpha walk, steering, buffers."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from riffusion.jam import JamSettings, JamSteer, JamWalk
from riffusion.playback import PlaybackClock


def walk_of(**settings: object) -> JamWalk:
    return JamWalk(JamSettings.model_validate({"prompt": "church bells", "seed": 7, **settings}))


def test_the_walk_steps_alpha_by_quarters_then_rolls_over_to_the_next_seed() -> None:
    walk = walk_of()
    jobs = [walk.next_job() for _ in range(9)]
    assert [j.alpha for j in jobs] == [0.0, 0.25, 0.5, 0.75, 1.0, 0.25, 0.5, 0.75, 1.0]
    assert all(j.end is not None for j in jobs)
    pairs = [(j.start.seed, j.end.seed) for j in jobs if j.end is not None]
    # Four clips per transition; at alpha 1 the end (just heard) becomes the start.
    assert pairs[:5] == [(7, 8)] * 5 and pairs[5:] == [(8, 9)] * 4
    assert {j.start.prompt for j in jobs} == {"church bells"}
    assert {(j.seed_image_id, j.num_inference_steps) for j in jobs} == {("og_beat", 50)}
    assert {(j.start.denoising, j.start.guidance) for j in jobs} == {(0.75, 7.0)}


def test_a_steer_shows_in_the_very_next_clip_keeping_the_noise_walk() -> None:
    walk = walk_of(mask_image_id="mask_beat_lines_80")
    first, second = walk.next_job(), walk.next_job()  # alpha 0, 0.25
    walk.steer(JamSteer(prompt="jazz with piano", seed_image_id="vibes", mask_image_id=""))
    steered = walk.next_job()
    assert steered.end is not None and second.end is not None
    assert steered.end.prompt == "jazz with piano"
    assert steered.end.seed == second.end.seed  # same noise target: no jump in the noise
    assert steered.start == second.start and steered.alpha == 0.5
    assert steered.seed_image_id == "vibes" and steered.mask_image_id is None
    assert first.mask_image_id == "mask_beat_lines_80"
    # Every later transition heads for the new prompt.
    later = [walk.next_job() for _ in range(4)]
    assert later[-1].start.prompt == "jazz with piano"
    assert all(j.end is not None and j.end.prompt == "jazz with piano" for j in later)


def test_a_steer_right_after_alpha_one_heads_the_next_transition_there() -> None:
    walk = walk_of()
    for _ in range(5):
        last = walk.next_job()
    assert last.alpha == 1.0
    walk.steer(JamSteer(prompt="marimba"))
    nxt = walk.next_job()
    # The start is the clip just heard (unchanged), the end is the new prompt.
    assert last.end is not None and nxt.end is not None
    assert nxt.start == last.end and nxt.end.prompt == "marimba" and nxt.alpha == 0.25


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": "  "}, "prompt"),
        ({"prompt": "x", "seed_image_id": "../etc"}, "seed_image_id"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "x", "denoising": "0.5"}, "denoising"),
        ({"prompt": "x", "surprise": 1}, "surprise"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as raised:
        JamSettings.model_validate(fields)
    assert field in {str(loc) for error in raised.value.errors() for loc in error["loc"]}


def test_the_clock_starts_with_the_first_clip_and_counts_down_in_real_time() -> None:
    clock = PlaybackClock()
    assert clock.ahead_s(100.0) == 0.0 and not clock.playing
    assert clock.deliver(5.12, now=100.0) is None
    assert clock.ahead_s(100.0) == pytest.approx(5.12)
    assert clock.ahead_s(102.0) == pytest.approx(3.12)
    assert clock.dry_at(102.0) == pytest.approx(105.12)
    assert clock.deliver(5.12, now=103.0) is None  # in time: no underrun
    assert clock.dry_at(103.0) == pytest.approx(110.24)


def test_a_clip_after_the_buffer_ran_dry_is_an_underrun_and_playback_resumes_with_it() -> None:
    clock = PlaybackClock()
    clock.deliver(5.0, now=0.0)
    assert clock.ahead_s(7.0) == 0.0  # stalled at what was delivered
    underrun = clock.deliver(5.0, now=7.0)
    assert underrun is not None and underrun.seconds == pytest.approx(2.0)
    assert underrun.clip_index == 1
    assert clock.ahead_s(7.0) == pytest.approx(5.0)  # the new clip plays from its start
    assert clock.dry_at(8.0) == pytest.approx(12.0)
    assert len(clock.underruns) == 1


def test_the_listeners_reported_position_overrides_the_estimate() -> None:
    clock = PlaybackClock()
    clock.deliver(5.0, now=0.0)
    clock.deliver(5.0, now=1.0)
    clock.report(2.0, now=4.0)  # it started late: 2 s played by t=4, not 4
    assert clock.ahead_s(4.0) == pytest.approx(8.0)
    clock.report(50.0, now=5.0)  # never past what was delivered
    assert clock.ahead_s(5.0) == 0.0
    with pytest.raises(ValueError, match="position_s"):
        clock.report(-1.0, now=5.0)

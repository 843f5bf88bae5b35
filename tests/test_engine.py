"""The real-time engine on the tiny model (CPU, fp32): joining, deadlines, cancellation.

Step times on the tiny model are a few milliseconds, too fast to stop a job
"mid-way" reliably, so most tests use ``PacedPipeline``: the same pipeline with
a fixed pause after every denoising step, standing in for a slower device.
Results are compared with the pipeline's own ``run`` at the batch-invariance
tolerance of tests/test_pipeline.py.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch

from riffusion.api_schemas import ModelReply, ModelRequest
from riffusion.engine import (
    Engine,
    EngineConfig,
    EngineJob,
    EngineObserver,
    JobCancelled,
    JobExpired,
    JobRefused,
    StepTimes,
    expected_steps,
)
from riffusion.listeners import Demand, ListenerAdmission
from riffusion.models import build_tiny_components
from riffusion.pipeline import GeneratedClip, JobState, RiffusionPipeline
from riffusion.schemas import GenerationJob, PromptInput
from riffusion.seed_images import SeedImageLibrary
from riffusion.spectrogram import SpectrogramParams
from serving.model_calls import run_in_engine
from tests.test_pipeline import write_library

LATENT_ATOL = 1e-4
STEP_PAUSE_S = 0.03


class PacedPipeline(RiffusionPipeline):
    """The tiny pipeline, pausing after every step; can be told to fail on a prompt, or on
    steps of more than ``max_step_batch`` jobs (as a GPU out of memory would)."""

    poison_prompt: str | None = None
    max_step_batch: int | None = None

    def denoise_step(self, batch: Sequence[JobState]) -> None:
        if any(state.job.start.prompt == self.poison_prompt for state in batch):
            raise RuntimeError("poisoned job")
        if self.max_step_batch is not None and len(batch) > self.max_step_batch:
            raise RuntimeError("out of memory")
        super().denoise_step(batch)
        time.sleep(STEP_PAUSE_S)


class Recorder(EngineObserver):
    """Counts outcomes and remembers batch sizes per step."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.samples_by_outcome: Counter[str] = Counter()
        self.batch_sizes: list[int] = []
        self.step_seconds: list[float] = []
        self.steps = threading.Semaphore(0)
        self.lock = threading.Lock()
        self.parked = 0  # job-steps sat out
        self.parked_at_step: list[tuple[int, int]] = []  # (steps run before, jobs parked)
        self.deadline_misses = 0
        self.queue_reports: list[tuple[int, int]] = []  # (waiting, running), as reported

    def on_queue(self, waiting: int, running: int) -> None:
        with self.lock:
            self.queue_reports.append((waiting, running))

    def on_step(self, batch_size: int, seconds: float, unet_samples: int) -> None:
        self.batch_sizes.append(batch_size)
        self.step_seconds.append(seconds)
        self.steps.release()

    def on_outcome(self, outcome: str, unet_samples: int) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            self.samples_by_outcome[outcome] += unet_samples

    def on_parked(self, jobs: int) -> None:
        with self.lock:
            self.parked += jobs
            self.parked_at_step.append((len(self.batch_sizes), jobs))

    def on_deadline_miss(self, late_s: float) -> None:
        with self.lock:
            self.deadline_misses += 1

    def wait_steps(self, count: int) -> None:
        for _ in range(count):
            assert self.steps.acquire(timeout=30)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> SeedImageLibrary:
    return write_library(tmp_path_factory.mktemp("seed_images"))


@pytest.fixture(scope="module")
def pipeline(library: SeedImageLibrary) -> PacedPipeline:
    return PacedPipeline(
        build_tiny_components(device="cpu"),
        seed_images=library,
        spectrogram_params=SpectrogramParams(num_griffin_lim_iters=2),
    )


def wait_until(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def make_engine(
    pipeline: RiffusionPipeline, max_batch_size: int = 4, postprocess: str = "inline"
) -> tuple[Engine, Recorder]:
    recorder = Recorder()
    config = EngineConfig(max_batch_size=max_batch_size, postprocess=postprocess)  # type: ignore[arg-type]
    return Engine(pipeline, config, recorder), recorder


def served_order(
    pipeline: RiffusionPipeline, submit: Callable[[Engine], list[EngineJob]]
) -> tuple[list[str], Recorder]:
    """The ids of the jobs ``submit`` queues, in the order a one-slot engine answers
    them: they all wait behind a job already running."""
    engine, recorder = make_engine(pipeline, max_batch_size=1)
    order: list[str] = []
    try:
        blocker = engine.submit(job("blocker", steps=6))
        recorder.wait_steps(1)
        entries = submit(engine)
        for entry in entries:
            entry.future.add_done_callback(lambda _f, name=entry.id: order.append(name))
        for entry in [blocker, *entries]:
            assert entry.future.result(timeout=60).audio.num_frames > 0
    finally:
        engine.stop()
    return order, recorder


def job(
    prompt: str = "smooth jazz",
    seed: int = 1,
    steps: int = 8,
    negative_prompt: str | None = None,
    guidance: float = 6.0,
    denoising: float = 0.75,
    **fields: object,
) -> GenerationJob:
    start = PromptInput(
        prompt=prompt,
        seed=seed,
        negative_prompt=negative_prompt,
        guidance=guidance,
        denoising=denoising,
    )
    values: dict[str, object] = {
        "start": start,
        "num_inference_steps": steps,
        "width": 64,
    }
    values.update(fields)
    return GenerationJob.model_validate(values)


def assert_close(a: GeneratedClip, b: GeneratedClip) -> None:
    assert torch.allclose(a.latents, b.latents, atol=LATENT_ATOL)
    diff = np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16))
    assert diff.max() <= 1


def test_a_job_that_joins_mid_way_matches_the_job_alone(pipeline: PacedPipeline) -> None:
    # Each job its own guidance and denoising: a shared step that applied one job's
    # settings to another would move that job away from its reference.
    first = job("church bells", seed=3, steps=12, guidance=2.0)
    joiner = job("(heavy:1.3) drums", seed=4, steps=6, negative_prompt="vocals", guidance=11.0)
    img2img = job(
        "marimba", seed=5, steps=10, seed_image_id="narrow_beat", guidance=7.5, denoising=0.5
    )
    img2img_deep = job(
        "marimba", seed=5, steps=10, seed_image_id="narrow_beat", guidance=4.0, denoising=0.9
    )
    jobs = [first, joiner, img2img, img2img_deep]
    alone = [pipeline.run([one])[0] for one in jobs]  # each job's reference, run by itself

    engine, recorder = make_engine(pipeline)
    try:
        running = engine.submit(first)
        recorder.wait_steps(4)  # first is 4 steps in when the others join
        joined = [engine.submit(one) for one in jobs[1:]]
        clips = [e.future.result(timeout=60) for e in (running, *joined)]
    finally:
        engine.stop()
    for clip, reference in zip(clips, alone, strict=True):
        assert_close(clip, reference)
    # The settings matter: same prompt, seed and seed image, other guidance and denoising.
    assert not torch.allclose(alone[2].latents, alone[3].latents, atol=100 * LATENT_ATOL)
    # They really shared forwards: some steps ran all four jobs.
    assert max(recorder.batch_sizes) == len(jobs)
    assert recorder.outcomes == {"completed": len(jobs)}


def test_queue_lengths_are_reported_when_they_change_not_at_every_step(
    pipeline: PacedPipeline,
) -> None:
    engine, recorder = make_engine(pipeline, max_batch_size=1)
    try:
        first, second = engine.submit(job(steps=8)), engine.submit(job(seed=2, steps=8))
        for entry in (first, second):
            entry.future.result(timeout=60)
        deadline = time.monotonic() + 30
        while recorder.queue_reports[-1:] != [(0, 0)]:  # idle again, and said so
            assert time.monotonic() < deadline, recorder.queue_reports
            time.sleep(0.01)
    finally:
        engine.stop()
    reports = recorder.queue_reports
    assert len(recorder.batch_sizes) >= 16  # 8 steps each (PLMS adds a warm-up step)
    assert all(earlier != later for earlier, later in itertools.pairwise(reports)), reports
    assert (0, 1) in reports  # the second job running alone
    assert len(reports) <= 5  # (1, 1) or (0, 1) before, (0, 1) between, (0, 0) after


def test_same_job_twice_is_deterministic_and_joining_at_step_zero_changes_nothing(
    pipeline: PacedPipeline,
) -> None:
    a, b = job("vibraphone", seed=8, steps=5), job("motorway groove", seed=9, steps=5)
    engine, _ = make_engine(pipeline)
    try:
        together = [engine.submit(a), engine.submit(b)]
        clip_a, clip_b = (e.future.result(timeout=60) for e in together)
        again, once_more = (engine.submit(a).future.result(timeout=60) for _ in range(2))
    finally:
        engine.stop()
    # Alone twice: bit-identical. Beside b: the same within the batch tolerance (a batch
    # of two may take other CPU kernels than one, so the last bits can differ by machine).
    assert torch.equal(again.latents, once_more.latents)
    assert np.array_equal(again.audio.samples, once_more.audio.samples)
    assert_close(clip_a, again)
    [alone_b] = pipeline.run([b])
    assert_close(clip_b, alone_b)


def test_waiting_jobs_are_admitted_earliest_deadline_first(pipeline: PacedPipeline) -> None:
    # Submitted latest-deadline first; one slot, so they run one by one.
    order, _ = served_order(
        pipeline,
        lambda engine: [
            engine.submit(job(f"job {timeout}", steps=2), timeout_s=timeout, job_id=str(timeout))
            for timeout in (300.0, 200.0, 250.0, 100.0)
        ],
    )
    assert order == ["100.0", "200.0", "250.0", "300.0"]


def test_a_job_that_cannot_meet_its_deadline_is_refused_at_once(pipeline: PacedPipeline) -> None:
    engine, recorder = make_engine(pipeline, max_batch_size=1)
    try:
        engine.submit(job(steps=3)).future.result(timeout=60)  # measures the step time
        busy = engine.submit(job("long one", steps=40))
        wait_until(lambda: busy.steps_done >= 1)
        began = time.monotonic()
        # 40 steps ahead of it in the only slot: about 40 x 30 ms before it could start.
        with pytest.raises(JobRefused) as refused:
            engine.submit(job(steps=5), timeout_s=0.5)
        assert time.monotonic() - began < 0.1
        assert refused.value.retry_after_s >= 1
        assert "cannot finish within 0.5 s" in str(refused.value)
        # A generous deadline is accepted and met.
        engine.submit(job(steps=2), timeout_s=60).future.result(timeout=60)
        busy.future.result(timeout=60)
    finally:
        engine.stop()
    assert recorder.outcomes["refused"] == 1


def test_a_job_past_its_deadline_stops_using_the_unet(pipeline: PacedPipeline) -> None:
    engine, recorder = make_engine(pipeline)
    try:
        # Before any step was measured nothing is refused, so this is accepted...
        late = engine.submit(job(steps=100), timeout_s=0.3)
        with pytest.raises(JobExpired, match="missed its deadline"):
            late.future.result(timeout=60)
    finally:
        engine.stop()
    # ...and dropped after about 0.3 s / 30 ms = 10 of its 100 steps.
    assert 0 < late.steps_done < 50
    assert recorder.outcomes == {"expired": 1}


def test_cancelled_jobs_leave_within_one_step_and_batch_mates_finish(
    pipeline: PacedPipeline,
) -> None:
    engine, recorder = make_engine(pipeline)
    try:
        keep = engine.submit(job("keeper", steps=10))
        drop = engine.submit(job("abandoned", steps=100))
        recorder.wait_steps(3)
        assert engine.cancel(drop.id)
        steps_at_cancel = drop.steps_done
        with pytest.raises(JobCancelled):
            drop.future.result(timeout=30)
        keep.future.result(timeout=60)
        # Cancelling the future itself (an asyncio caller going away) works the same way.
        gone = engine.submit(job("gone", steps=100))
        recorder.wait_steps(2)
        assert gone.future.cancel()
        keep_again = engine.submit(job("keeper 2", steps=3))
        keep_again.future.result(timeout=60)
    finally:
        engine.stop()
    assert drop.steps_done <= steps_at_cancel + 1
    assert gone.steps_done < 100
    assert recorder.outcomes == {"completed": 2, "cancelled": 2}
    assert engine.cancel(drop.id) is False  # answered jobs are forgotten


class GatedFinishPipeline(PacedPipeline):
    """Post-processing waits at a gate, so jobs can be cancelled while queued for it."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gate = threading.Event()
        self.finished_prompts: list[str] = []
        self.finish_calls: list[int] = []  # jobs per call

    def finish(self, group: Sequence[JobState]) -> list[GeneratedClip]:
        assert self.gate.wait(timeout=60)
        self.finished_prompts += [state.job.start.prompt for state in group]
        self.finish_calls.append(len(group))
        return super().finish(group)


@pytest.fixture
def gated(library: SeedImageLibrary) -> GatedFinishPipeline:
    return GatedFinishPipeline(
        build_tiny_components(device="cpu"),
        seed_images=library,
        spectrogram_params=SpectrogramParams(num_griffin_lim_iters=2),
    )


def test_jobs_abandoned_while_queued_for_post_processing_skip_it(
    gated: GatedFinishPipeline,
) -> None:
    engine, recorder = make_engine(gated, postprocess="thread")
    try:
        first = engine.submit(job("first", steps=2))
        wait_until(lambda: first.state is not None)
        wait_until(lambda: first.prepared.finished)  # now held at the post-processing gate
        left = engine.submit(job("left", steps=2))
        wait_until(lambda: left.state is not None and left.prepared.finished)
        time.sleep(STEP_PAUSE_S * 2)  # out of its last step, queued for post-processing
        assert engine.cancel(left.id)
        gated.gate.set()
        assert first.future.result(timeout=60).audio is not None
        with pytest.raises(JobCancelled):
            left.future.result(timeout=60)
    finally:
        gated.gate.set()
        engine.stop()
    assert gated.finished_prompts == ["first"]  # no decode or Griffin-Lim for nobody
    assert recorder.outcomes == {"completed": 1, "cancelled": 1}


def test_on_a_cpu_jobs_done_together_are_answered_one_by_one_earliest_deadline_first(
    gated: GatedFinishPipeline,
) -> None:
    engine, _ = make_engine(gated)  # inline: the engine thread itself waits at the gate
    answered: list[str] = []
    try:
        blocker = engine.submit(job("blocker", steps=2))
        wait_until(lambda: blocker.state is not None and blocker.prepared.finished)
        # Both wait while the engine is held, so they are admitted and finish together.
        jobs = [
            engine.submit(job(name, steps=4), timeout_s=timeout)
            for name, timeout in (("later", 300.0), ("sooner", 200.0))
        ]
        for entry in jobs:
            entry.future.add_done_callback(
                lambda _, name=entry.job.start.prompt: answered.append(name)
            )
        gated.gate.set()
        for entry in [blocker, *jobs]:
            entry.future.result(timeout=60)
    finally:
        gated.gate.set()
        engine.stop()
    assert gated.finish_calls == [1, 1, 1]  # one decode + Griffin-Lim call each, not one for both
    assert answered == ["sooner", "later"]


def test_a_failing_job_fails_alone(pipeline: PacedPipeline) -> None:
    engine, recorder = make_engine(pipeline)
    pipeline.poison_prompt = "poison"
    try:
        mates = [engine.submit(job(f"mate {i}", seed=i, steps=4)) for i in range(3)]
        bad = engine.submit(job("poison", steps=4))
        # Passes the API's tokenizer-free lower bound (100 words) but the tiny model's
        # tokenizer makes 400 tokens of it: more than 3 CLIP windows, raised in prepare.
        too_long = engine.submit(job(" ".join(["word"] * 100), steps=4))
        with pytest.raises(RuntimeError, match="poisoned"):
            bad.future.result(timeout=60)
        with pytest.raises(ValueError):
            too_long.future.result(timeout=60)
        clips = [m.future.result(timeout=60) for m in mates]
    finally:
        pipeline.poison_prompt = None
        engine.stop()
    alone = pipeline.run([m.job for m in mates])
    for clip, reference in zip(clips, alone, strict=True):
        assert_close(clip, reference)
    assert recorder.outcomes == {"completed": 3, "failed": 2}


def served(
    engine: Engine, pipeline: RiffusionPipeline, jobs: Sequence[GenerationJob]
) -> list[ModelReply]:
    """The jobs as the model service runs one call's worth of them (``run_in_engine``)."""
    requests = [ModelRequest(job=j, submitted_at=time.time()) for j in jobs]
    return asyncio.run(run_in_engine(engine, pipeline.prompt_encoder, requests))


def test_a_job_the_model_refuses_never_joins_the_batch(pipeline: PacedPipeline) -> None:
    engine, recorder = make_engine(pipeline)
    # Passes the API's tokenizer-free bound; the tiny tokenizer makes 400 tokens of it.
    too_long = " ".join(["word"] * 100)
    try:
        ok, refused, fine = served(engine, pipeline, [job("ok"), job(too_long), job("fine")])
    finally:
        engine.stop()
    assert ok.result is not None and fine.result is not None
    assert refused.result is None and refused.error is not None
    assert refused.error.status == 400 and refused.error.field == "start.prompt"
    assert recorder.outcomes == {"completed": 2}  # the refused job never entered the engine
    assert set(recorder.batch_sizes) == {2}  # one batch, without the refused job


def test_a_job_failing_at_run_time_fails_alone_and_its_batch_mates_get_results(
    pipeline: PacedPipeline,
) -> None:
    engine, recorder = make_engine(pipeline)
    pipeline.poison_prompt = "boom"
    try:
        ok, boom, fine = served(engine, pipeline, [job("ok"), job("boom"), job("fine")])
    finally:
        pipeline.poison_prompt = None
        engine.stop()
    assert ok.result is not None and fine.result is not None
    assert boom.result is None and boom.error is not None
    assert boom.error.status == 500 and "poisoned" not in boom.error.message  # logged, not echoed
    assert recorder.outcomes == {"completed": 2, "failed": 1}


def test_a_batch_that_fails_only_together_still_answers_every_job(
    pipeline: PacedPipeline,
) -> None:
    engine, recorder = make_engine(pipeline)
    pipeline.max_step_batch = 1
    jobs = [job(prompt, seed=i, steps=3) for i, prompt in enumerate(("a", "b", "c"))]
    try:
        replies = served(engine, pipeline, jobs)
    finally:
        pipeline.max_step_batch = None
        engine.stop()
    assert all(reply.result is not None for reply in replies)
    assert recorder.outcomes == {"completed": 3}


@pytest.mark.parametrize("postprocess", ["thread", "inline"])
def test_a_burst_of_concurrent_submissions_is_answered_exactly_once(
    pipeline: PacedPipeline, postprocess: str
) -> None:
    engine, recorder = make_engine(pipeline, max_batch_size=3, postprocess=postprocess)
    entries = []
    lock = threading.Lock()

    def submit(i: int) -> None:
        entry = engine.submit(job(f"burst {i % 4}", seed=i, steps=2 + i % 3), job_id=f"job-{i}")
        with lock:
            entries.append(entry)

    try:
        threads = [threading.Thread(target=submit, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        results = [e.future.result(timeout=120) for e in entries]
    finally:
        engine.stop()
    assert len({e.id for e in entries}) == 16 and len(results) == 16
    assert recorder.outcomes == {"completed": 16}
    assert max(recorder.batch_sizes) <= 3
    assert engine.queue_lengths() == (0, 0)


def test_expected_steps_follow_img2img_denoising() -> None:
    assert expected_steps(job(steps=50)) == 50
    assert expected_steps(job(steps=50, seed_image_id="og_beat")) == 37  # int(50 * 0.75)


def test_step_times_fit_overhead_plus_work_and_skip_the_warm_up_step() -> None:
    times = StepTimes()
    assert times.step_s(4096) == 0.0 and not times.measured
    times.observe(512, 9.0)  # the first step pays warm-up costs: ignored
    times.observe(512, 0.05)
    # One size measured: its time, not scaled (small clips are mostly overhead).
    assert times.step_s(4096) == pytest.approx(0.05)
    times.observe(4096, 0.12)
    # overhead 0.04 s + 0.02 s per 1024 latent pixels
    assert times.step_s(512) == pytest.approx(0.05)
    assert times.step_s(2048) == pytest.approx(0.08)
    assert times.step_s(8192) == pytest.approx(0.2)


def test_calibration_measures_one_job_and_a_full_batch_before_any_job(
    pipeline: PacedPipeline,
) -> None:
    engine, recorder = make_engine(pipeline, max_batch_size=4)
    try:
        assert not engine.step_times.measured
        measured = engine.calibrate()
        assert set(measured) == {1, 4}
        # The paced pipeline sleeps after every step: a step costs at least the pause.
        assert all(seconds >= STEP_PAUSE_S for seconds in measured.values())
        # Two batch sizes: a line, so a batch is priced by its own size from the start.
        work = 64 * 64  # a default-width clip's latent pixels
        assert engine.step_times.step_s_at_most(4 * work) == engine.step_times.step_s(4 * work)
        assert engine.step_times.step_s(work) >= STEP_PAUSE_S
        # A device that cannot keep even one listener in real time refuses the first.
        gate = ListenerAdmission(engine.step_times, 4, overlapped_postprocess=False)
        slow = Demand(steps=round(6.0 / engine.step_times.step_s(work)), work=work, period_s=5.12)
        decision = gate.open("first", slow)
        assert not decision.accepted and "full" in decision.message
        assert recorder.batch_sizes == []  # no job ran: nothing for the observer
    finally:
        engine.stop()


def test_a_calibration_size_that_fails_is_left_to_the_requests(library: SeedImageLibrary) -> None:
    small = PacedPipeline(
        build_tiny_components(device="cpu"),
        seed_images=library,
        spectrogram_params=SpectrogramParams(num_griffin_lim_iters=2),
    )
    small.max_step_batch = 2  # a full batch of 4 runs out of memory
    engine, recorder = make_engine(small, max_batch_size=4)
    try:
        assert set(engine.calibrate()) == {1}  # the service still starts
        assert engine.step_times.measured
        engine.submit(job("after calibration", steps=2)).future.result(timeout=120)
        assert recorder.outcomes == {"completed": 1}  # served as before
    finally:
        engine.stop()


def test_a_job_due_sooner_is_served_first_and_does_not_expire_when_due(
    pipeline: PacedPipeline,
) -> None:
    # Same deadline (the request timeout); a listener's clip says when it is due.
    order, recorder = served_order(
        pipeline,
        lambda engine: [
            engine.submit(job("per request", steps=2), timeout_s=300.0, job_id="request"),
            engine.submit(job("listener", steps=2), 300.0, "listener", due_s=0.001),
        ],
    )
    assert order == ["listener", "request"]
    assert recorder.outcomes == {"completed": 3}  # due long before it ran, still completed


def test_a_job_promised_real_time_is_served_before_one_due_sooner_but_not_promised(
    pipeline: PacedPipeline,
) -> None:
    """An admitted listener's clip (promised) due in a while goes before a web-app clip
    due sooner; among the clips not promised, the one due sooner goes first."""
    order, _ = served_order(
        pipeline,
        lambda engine: [
            engine.submit(job("late", steps=2), timeout_s=300.0, job_id="request"),
            engine.submit(job("web app", steps=2), 300.0, "web app", due_s=0.002),
            engine.submit(job("listener", steps=2), 300.0, "listener", 30.0, promised=True),
        ],
    )
    assert order == ["listener", "web app", "request"]


# --- step-level priority: a job due sooner is not made late by the ones due later -------------

PER_JOB_S = 0.25  # what a step costs per job in it (cpu_like)
FLAT_S = 0.5  # what a step costs whatever its size (gpu_like)


class WorkPacedPipeline(RiffusionPipeline):
    """The tiny pipeline, each step padded to last ``per_job_s`` per job in it (a CPU,
    where a step costs in proportion to its jobs) plus ``flat_s`` (a GPU, where a batch
    costs as one job), so that costs hold on a loaded machine."""

    per_job_s = 0.0
    flat_s = 0.0

    def denoise_step(self, batch: Sequence[JobState]) -> None:
        began = time.perf_counter()
        super().denoise_step(batch)
        cost_s = self.flat_s + self.per_job_s * len(batch)
        time.sleep(max(0.0, cost_s - (time.perf_counter() - began)))


def work_paced(library: SeedImageLibrary, per_job_s: float, flat_s: float) -> WorkPacedPipeline:
    pipeline = WorkPacedPipeline(
        build_tiny_components(device="cpu"),
        seed_images=library,
        spectrogram_params=SpectrogramParams(num_griffin_lim_iters=2),
    )
    pipeline.per_job_s, pipeline.flat_s = per_job_s, flat_s
    return pipeline


@pytest.fixture(scope="module")
def cpu_like(library: SeedImageLibrary) -> WorkPacedPipeline:
    return work_paced(library, per_job_s=PER_JOB_S, flat_s=0.0)


@pytest.fixture(scope="module")
def gpu_like(library: SeedImageLibrary) -> WorkPacedPipeline:
    return work_paced(library, per_job_s=0.0, flat_s=FLAT_S)


def listener_beside_requests(
    engine: Engine, with_due: bool
) -> tuple[EngineJob, list[EngineJob], dict[str, float], float]:
    """A listener's clip and three requests (due at their timeout) submitted together,
    once a one-job and a three-job step have been measured. The listener's clip is due
    (``with_due``) in what it takes alone, as the engine measured it, plus half of one
    job's step cost per step: on time alone, late beside one request on a CPU, on time
    beside all three on a GPU. Returns the entries, when each was answered
    (time.monotonic()) and that due time."""
    alone = engine.submit(job("warm-up alone", steps=3))
    alone.future.result(timeout=60)
    for entry in [engine.submit(job("warm-up together", seed=i, steps=3)) for i in range(3)]:
        entry.future.result(timeout=60)
    times = engine.step_times
    alone_s = alone.expected_steps * times.step_s(alone.work) + times.postprocess_s(alone.work)
    due_s = alone_s + 0.5 * alone.expected_steps * PER_JOB_S
    requests = [
        (job(f"request {i}", seed=10 + i, steps=6), 300.0, f"request {i}", 0.0, None, False)
        for i in range(3)
    ]
    listener = (
        job("listener", seed=20, steps=3),
        300.0,
        "listener",
        0.0,
        due_s if with_due else None,
        with_due,  # a listener's clip: promised real time
    )
    entries = [e for e in engine.submit_together([*requests, listener]) if isinstance(e, EngineJob)]
    assert len(entries) == 4
    answered: dict[str, float] = {}
    for entry in entries:
        entry.future.add_done_callback(
            lambda _f, name=entry.id: answered.__setitem__(name, time.monotonic())
        )
    for entry in entries:
        entry.future.result(timeout=60)
    wait_until(lambda: len(answered) == 4)
    return entries[3], entries[:3], answered, due_s


def test_on_a_cpu_a_job_due_sooner_is_answered_in_time_beside_jobs_due_later(
    cpu_like: WorkPacedPipeline,
) -> None:
    engine, recorder = make_engine(cpu_like)
    try:
        listener, requests, answered, _ = listener_beside_requests(engine, with_due=True)
    finally:
        engine.stop()
    assert answered["listener"] <= listener.due  # on time
    assert all(answered[r.id] > answered["listener"] for r in requests)
    # All three sat out the listener's first step (beside any of them it would be late);
    # one may join its last steps once it is ahead. They lost no work, met their deadlines.
    assert recorder.parked_at_step[0][1] == 3
    assert recorder.parked <= 3 * listener.expected_steps
    assert recorder.outcomes == {"completed": 1 + 3 + 4} and recorder.deadline_misses == 0
    # Being parked changes nobody's result: each matches the job run alone.
    for entry in [listener, *requests]:
        [reference] = cpu_like.run([entry.job])
        assert_close(entry.future.result(), reference)


def test_on_a_cpu_the_same_job_without_a_due_time_shares_every_step_and_is_late(
    cpu_like: WorkPacedPipeline,
) -> None:
    engine, recorder = make_engine(cpu_like)
    try:
        listener, _, answered, due_s = listener_beside_requests(engine, with_due=False)
    finally:
        engine.stop()
    # Due at its deadline, like the requests: everyone steps, each step four jobs' cost.
    assert recorder.parked == 0
    assert answered["listener"] - listener.submitted_at > due_s


def test_on_a_gpu_where_a_batch_costs_as_one_nothing_is_parked(
    gpu_like: WorkPacedPipeline,
) -> None:
    engine, recorder = make_engine(gpu_like)
    try:
        listener, _, answered, _ = listener_beside_requests(engine, with_due=True)
    finally:
        engine.stop()
    assert recorder.parked == 0 and max(recorder.batch_sizes) == 4
    assert answered["listener"] <= listener.due  # on time beside all three
    assert recorder.outcomes == {"completed": 1 + 3 + 4}

"""The autoscaling rule against a real Prometheus (Debian's package) scraping a served instance.

prometheus-adapter answers the HPA with the rule's ``metricsQuery`` after filling
in its template. This test fills it in the same way for one pod, lets Prometheus
scrape a real ``bentoml serve`` (labelled as kube-prometheus-stack labels a pod
target), holds a known number of clips in flight at the model service, and
checks that the query Prometheus answers equals that number, then 0 once the
clips are answered. ``make test`` installs Prometheus when it is missing.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest
import yaml

from load_tests.client import metric_total
from load_tests.server import LocalServer, free_port, log_tail, stop_process_group
from tests.test_deploy import AUTOSCALING_METRIC, FALLBACK_METRIC, LOAD_METRIC, adapter_rule

NAMESPACE = "riffusion-test"
POD = "riffusion-0"
# The same instance scraped a second time as another pod whose riffusion_clips_in_flight
# is dropped at scrape time: a pod whose custom metric has gone missing.
POD_WITHOUT_METRIC = "riffusion-1"
SCRAPE_INTERVAL = "500ms"
CLIPS = 3
# Enough denoising steps that the tiny model keeps the clips in flight for several
# scrape intervals (seconds on a quiet 2-core machine).
STEPS = 30
DEADLINE_S = 240.0


def render_metrics_query(rule: dict, series: str, namespace: str, pods: list[str]) -> str:
    """The adapter's template filled as it does for a pods query in one namespace."""
    label_matchers = f'namespace="{namespace}",pod=~"{"|".join(pods)}"'
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", label_matchers)
        .replace("<<.GroupBy>>", "pod")
    )


def series_name(rule: dict) -> str:
    return str(rule["seriesQuery"]).split("{", 1)[0]


@pytest.fixture(scope="module")
def served(open_server: LocalServer) -> str:
    return open_server.url


@pytest.fixture(scope="module")
def prometheus(served: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus package is missing (`make test` installs it)"
    tmp = tmp_path_factory.mktemp("prometheus")
    target = served.removeprefix("http://")
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL},
        "scrape_configs": [
            {
                "job_name": "riffusion",
                "metrics_path": "/metrics",
                # The labels a PodMonitor target carries in kube-prometheus-stack.
                "static_configs": [
                    {"targets": [target], "labels": {"namespace": NAMESPACE, "pod": POD}}
                ],
            },
            {
                "job_name": "riffusion-without-custom-metric",
                "metrics_path": "/metrics",
                "static_configs": [
                    {
                        "targets": [target],
                        "labels": {"namespace": NAMESPACE, "pod": POD_WITHOUT_METRIC},
                    }
                ],
                "metric_relabel_configs": [
                    {
                        "source_labels": ["__name__"],
                        "regex": AUTOSCALING_METRIC,
                        "action": "drop",
                    }
                ],
            },
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    log_path = tmp / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address={url.removeprefix('http://')}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_for(
            lambda: _prometheus_ready(url), 60, f"Prometheus not ready:\n{log_tail(log_path)}"
        )
        yield url
    finally:
        stop_process_group(process)


def _prometheus_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_for(
    condition: Callable[[], bool], timeout_s: float, message: str | Callable[[], str]
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(message() if callable(message) else message)


def _query(prometheus: str, promql: str) -> dict[str, float]:
    """Instant query: {pod: value} of the result vector."""
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    return {r["metric"].get("pod", ""): float(r["value"][1]) for r in body["data"]["result"]}


def _text_to_audio(served: str, seed: int, steps: int = STEPS) -> int:
    body = {"prompt": "slow piano", "seed": seed, "num_inference_steps": steps, "duration_s": 0.64}
    return httpx.post(f"{served}/text_to_audio", json=body, timeout=DEADLINE_S).status_code


def test_series_discovery_finds_the_pod(served: str, prometheus: str) -> None:
    """The rule's seriesQuery matches the scraped series with the pod's labels."""
    rule = adapter_rule()
    # The gauge exists from the first clip on: warm up with one.
    assert _text_to_audio(served, seed=0, steps=2) == 200

    def discovered() -> bool:
        response = httpx.get(
            f"{prometheus}/api/v1/series", params={"match[]": rule["seriesQuery"]}, timeout=10
        )
        labels = response.json()["data"]
        return any(s.get("namespace") == NAMESPACE and s.get("pod") == POD for s in labels)

    _wait_for(discovered, 30, f"no series matches {rule['seriesQuery']}")


def test_metrics_query_equals_the_clips_in_flight(served: str, prometheus: str) -> None:
    rule = adapter_rule()
    series = series_name(rule)
    promql = render_metrics_query(rule, series, NAMESPACE, [POD])
    # Idle first: the warm-up clip of the discovery test is answered.
    _wait_for(lambda: _query(prometheus, promql).get(POD) == 0, 30, f"{promql} not 0 at idle")

    with ThreadPoolExecutor(CLIPS) as pool:
        calls: list[Future[int]] = [
            pool.submit(_text_to_audio, served, seed) for seed in range(1, CLIPS + 1)
        ]

        def all_in_flight() -> bool:
            return _query(prometheus, promql).get(POD) == CLIPS

        # Prometheus sees every clip in flight while none has been answered yet.
        _wait_for(all_in_flight, DEADLINE_S, f"{promql} never reached {CLIPS}")
        assert not any(call.done() for call in calls), "a clip finished before the check"
        assert [call.result() for call in calls] == [200] * CLIPS

    _wait_for(lambda: _query(prometheus, promql).get(POD) == 0, 30, f"{promql} not back to 0")


def test_fallback_metric_scales_when_the_custom_metric_is_missing(
    served: str, prometheus: str
) -> None:
    """The HPA's second metric (deploy/kubernetes/hpa.yaml) counts the same clips from
    BentoML's own gauge: where riffusion_clips_in_flight is missing it still reports them,
    so the HPA keeps scaling up on it instead of stalling at <unknown>."""
    primary = adapter_rule(AUTOSCALING_METRIC)
    fallback = adapter_rule(FALLBACK_METRIC)
    pods = [POD, POD_WITHOUT_METRIC]
    primary_query = render_metrics_query(primary, series_name(primary), NAMESPACE, pods)
    fallback_query = render_metrics_query(fallback, series_name(fallback), NAMESPACE, pods)

    def idle() -> bool:
        return _query(prometheus, fallback_query) == {POD: 0, POD_WITHOUT_METRIC: 0}

    _wait_for(
        idle, 60, lambda: f"{fallback_query} not 0 at idle: {_query(prometheus, fallback_query)}"
    )
    # The broken pod has no custom metric at all: the adapter would answer nothing for it.
    assert POD_WITHOUT_METRIC not in _query(prometheus, primary_query)

    with ThreadPoolExecutor(CLIPS) as pool:
        calls: list[Future[int]] = [
            pool.submit(_text_to_audio, served, seed) for seed in range(11, 11 + CLIPS)
        ]

        def fallback_sees_all() -> bool:
            return _query(prometheus, fallback_query) == {POD: CLIPS, POD_WITHOUT_METRIC: CLIPS}

        _wait_for(
            fallback_sees_all,
            DEADLINE_S,
            lambda: f"{fallback_query} never reached {CLIPS}: {_query(prometheus, fallback_query)}",
        )
        assert not any(call.done() for call in calls), "a clip finished before the check"
        # Where both exist they agree, so one target (8 per pod) fits both.
        assert _query(prometheus, primary_query) == {POD: CLIPS}
        assert [call.result() for call in calls] == [200] * CLIPS

    _wait_for(idle, 30, f"{fallback_query} not back to 0")


def test_device_load_rule_reads_what_the_model_service_publishes(
    served: str, prometheus: str
) -> None:
    """The HPA's fourth metric through its adapter rule: the model service's predicted
    device load for the pod, as the service publishes it (a clip of the last minute
    counts, so it is above zero after one)."""
    rule = adapter_rule(LOAD_METRIC)
    promql = render_metrics_query(rule, series_name(rule), NAMESPACE, [POD])
    assert _text_to_audio(served, seed=99, steps=2) == 200

    def read_as_published() -> bool:
        value = _query(prometheus, promql).get(POD)
        published = metric_total(served, LOAD_METRIC)
        return value is not None and value > 0 and abs(value - published) < 0.05

    _wait_for(read_as_published, 60, f"{promql} never matched the published load")

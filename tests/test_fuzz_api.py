"""Schemathesis against a served instance: no 5xx, and every answer matches the OpenAPI spec.

Bounded for the suite (several hundred requests, valid ones made cheap by
``tests/fuzz_hooks.py``). The longer run recorded in docs/benchmarks.md is the same
command with more examples and every phase (see docs/benchmarks.md):
``python -m tests.test_fuzz_api URL --api-key KEY --max-examples 300``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence

import pytest

from load_tests.server import REPO_ROOT, LocalServer, executable
from tests.shared_servers import SHARED_API_KEY as API_KEY

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
)
SUITE_EXAMPLES = 30


def schemathesis_command(
    url: str,
    api_key: str,
    max_examples: int,
    phases: str,
    seed: int = 1,
    max_time_s: int | None = None,
) -> list[str]:
    # With a time budget, fuzzing repeats until it is spent (the long documented run);
    # every case then runs, failures or not, so the summary counts them all.
    budget = ["--max-time", str(max_time_s), "--continue-on-failure"] if max_time_s else []
    return [
        executable("schemathesis"),
        "run",
        f"{url}/docs.json",
        "--header",
        f"Authorization: Bearer {api_key}",
        "--checks",
        ",".join(CHECKS),
        "--mode",
        "all",
        "--phases",
        phases,
        "--max-examples",
        str(max_examples),
        "--seed",
        str(seed),
        "--workers",
        "1",
        "--request-timeout",
        "300",
        "--no-shrink",
        *budget,
    ]


def run_fuzz(
    url: str,
    api_key: str,
    max_examples: int,
    phases: str = "fuzzing",
    max_time_s: int | None = None,
    capture: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run schemathesis; ``capture=False`` streams its report to this process's output."""
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks",
        "PYTHONPATH": str(REPO_ROOT),
        "COLUMNS": "200",
    }
    return subprocess.run(
        schemathesis_command(url, api_key, max_examples, phases, max_time_s=max_time_s),
        cwd=REPO_ROOT,
        env=env,
        capture_output=capture,
        text=True,
        # A request may still be running when the budget ends (--request-timeout 300).
        timeout=max(1800, (max_time_s or 0) + 600),
        check=False,
    )


def requests_sent(output: str) -> int:
    """Total test cases schemathesis reports ('N generated' in its summary)."""
    return sum(int(n) for n in re.findall(r"(\d+) generated", output))


@pytest.fixture(scope="module")
def server(keyed_server: LocalServer) -> str:
    return keyed_server.url


@pytest.mark.timeout(1200)
def test_fuzzed_requests_get_no_5xx_and_match_the_spec(server: str) -> None:
    # The coverage phase tries every field's boundaries and types (it found the spec
    # refusing inputs the API accepted); fuzzing adds random ones.
    result = run_fuzz(server, API_KEY, SUITE_EXAMPLES, phases="coverage,fuzzing")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    # The run really exercised the API: coverage alone makes about 600 cases here, and
    # fuzzing stops early on operations whose inputs it cannot vary further.
    assert requests_sent(output) >= 600, output[-3000:]


def main(argv: Sequence[str]) -> int:
    """``python -m tests.test_fuzz_api URL [--max-examples N] [--api-key KEY] [--max-time S]``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--max-examples", type=int, default=300)
    parser.add_argument("--api-key", default=os.environ.get("RIFFUSION_API_KEY", ""))
    parser.add_argument("--phases", default="examples,coverage,fuzzing")
    parser.add_argument(
        "--max-time",
        type=int,
        default=None,
        help="seconds: fuzzing repeats until they are spent, and every failure is counted",
    )
    args = parser.parse_args(argv)
    sys.stdout.flush()
    result = run_fuzz(
        args.url, args.api_key, args.max_examples, args.phases, args.max_time, capture=False
    )
    return result.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

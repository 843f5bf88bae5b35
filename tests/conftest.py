"""Shared served instances (see tests/shared_servers.py) and the order that keeps them short-lived.

Each name in ``SHARED_CONFIGS`` is a module-scoped fixture giving that instance
(a ``LocalServer``), started on first use. The test modules that use one instance are
run one after another (at the place of the first of them; order within a module is
kept), and the instance is stopped after the last test that uses it, so at most one
shared instance runs at a time.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from types import FrameType

import pytest

from load_tests.server import LocalServer
from tests.shared_servers import SHARED_CONFIGS, SharedServers

SHARED_SERVERS = pytest.StashKey[SharedServers]()
LAST_USERS = pytest.StashKey[dict[str, str]]()  # fixture name -> nodeid of its last user


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # A CI time limit (or `timeout`) sends SIGTERM: end the session as Ctrl-C does, so
    # fixtures are torn down and no served instance outlives it.
    signal.signal(signal.SIGTERM, _interrupt)


def _shared_names(item: pytest.Item) -> set[str]:
    return set(getattr(item, "fixturenames", ())) & set(SHARED_CONFIGS)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the modules that share an instance consecutively, at the first one's place."""
    module_rank: dict[object, int] = {}
    first_rank_of: dict[str, int] = {}
    group_rank: dict[object, int] = {}
    for item in items:
        module = item.path
        if module not in module_rank:
            module_rank[module] = len(module_rank)
            group_rank[module] = module_rank[module]
        for name in _shared_names(item):
            rank = first_rank_of.setdefault(name, module_rank[module])
            group_rank[module] = min(group_rank[module], rank)
    items.sort(key=lambda item: (group_rank[item.path], module_rank[item.path]))


def pytest_collection_finish(session: pytest.Session) -> None:
    last_users = {name: item.nodeid for item in session.items for name in _shared_names(item)}
    session.config.stash[LAST_USERS] = last_users


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    try:
        return (yield)
    finally:
        servers = item.config.stash.get(SHARED_SERVERS, None)
        if servers is not None:
            for name, nodeid in item.config.stash.get(LAST_USERS, {}).items():
                if nodeid == item.nodeid:
                    servers.stop(name)


@pytest.fixture(scope="session")
def shared_servers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SharedServers]:
    servers = SharedServers(tmp_path_factory)
    request.config.stash[SHARED_SERVERS] = servers
    try:
        yield servers
    finally:
        servers.stop_all()
        del request.config.stash[SHARED_SERVERS]


# Module-scoped, not session-scoped: a module after the instance was stopped starts it anew.
@pytest.fixture(scope="module")
def keyed_server(shared_servers: SharedServers) -> LocalServer:
    """With SHARED_API_KEY, cheap clips and small upload limits."""
    return shared_servers.get("keyed_server")


@pytest.fixture(scope="module")
def open_server(shared_servers: SharedServers) -> LocalServer:
    """Without an API key, with the project's own seed images."""
    return shared_servers.get("open_server")

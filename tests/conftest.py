"""Shared harness: the real 3-region mesh, PostgreSQL and Redis on free ports.

Session-scoped processes die with the test process (PR_SET_PDEATHSIG) and are stopped in
finalizers even when tests fail. Inter-region latencies are the topology's scaled by
MERIDIAN_TEST_LATENCY_SCALE (default 0.25: lon-nyc ~9 ms, lon-sgp ~21 ms, nyc-sgp ~29 ms) so the
suite stays fast while every WAN hop stays visible.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from ops.devstack import Devstack, MeshPlan
from ops.loadgen import seed_top_of_book
from ops.procs import PostgresServer, RedisServer, free_ports
from regions.topology import Topology, load_topology

LATENCY_SCALE = float(os.environ.get("MERIDIAN_TEST_LATENCY_SCALE", "0.25"))


class Mesh(Devstack):
    """The running test mesh (a Devstack with helpers for tests)."""

    def proxy(self, link: str) -> _LinkHandle:
        return _LinkHandle(self, link)


class _LinkHandle:
    def __init__(self, mesh: Devstack, link: str) -> None:
        self.mesh, self.name = mesh, link

    def cut(self) -> None:
        self.mesh.links.cut(self.name)

    def blackhole(self) -> None:
        self.mesh.links.blackhole(self.name)

    def restore(self) -> None:
        self.mesh.links.restore(self.name)

    @property
    def one_way_ms(self) -> float:
        return next(ln.one_way_ms for ln in self.mesh.topology.links if ln.name == self.name)


@pytest.fixture(scope="session")
def base_topology() -> Topology:
    return load_topology()


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory, base_topology: Topology) -> Iterator[Mesh]:
    run_dir = tmp_path_factory.mktemp("mesh")
    plan = MeshPlan.free(base_topology, run_dir, latency_scale=LATENCY_SCALE)
    m = Mesh(plan)
    try:
        m.up(with_pg=False, with_redis=True)
        yield m
    finally:
        m.down()


@pytest.fixture(scope="session")
def topology(mesh: Mesh) -> Topology:
    return mesh.topology


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresServer]:
    # Outside pytest's temp root: a second pytest session resets that to mode 0700 and the
    # postgres user (the server runs as it when we are root) would lose its data dir.
    d = Path(tempfile.mkdtemp(prefix="meridian-pg-", dir="/tmp"))
    d.chmod(0o755)
    (port,) = free_ports(1)
    # fsync off: test speed; durability claims are exercised by the devstack and drills
    server = PostgresServer(d / "data", port, d / "postgres.log", fsync=False)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def pg_dsn(pg: PostgresServer, request: pytest.FixtureRequest) -> str:
    """A fresh, empty database for this test module."""
    name = "t_" + uuid.uuid4().hex[:12]
    return pg.create_database(name)


@pytest.fixture(scope="session")
def redis_server(mesh: Mesh) -> RedisServer:
    """The mesh's own Redis (started with it, on a free port)."""
    assert mesh.redis is not None
    return mesh.redis


@pytest.fixture(scope="session")
def redis_url(mesh: Mesh) -> str:
    return mesh.redis_url


@pytest.fixture(scope="session")
def order_path(mesh: Mesh) -> Mesh:
    """Gateway, risk and execution workers of every region, as real processes."""
    from ops.services import order_path_workers

    seed_top_of_book(mesh.redis_url, mesh.topology)
    for region in mesh.topology.codes:
        for name, argv in order_path_workers(mesh, region):
            mesh.start_worker(name, region, argv)
    return mesh


@pytest.fixture
async def clients(mesh: Mesh) -> AsyncIterator[dict[str, NATS]]:
    """One connected client per region (role sre), closed after the test."""
    out = {code: await mesh.connect(code) for code in mesh.topology.codes}
    try:
        yield out
    finally:
        for nc in out.values():
            await nc.close()


@pytest.fixture
def unique() -> str:
    """A short unique token for subjects, stream names and schemas."""
    return uuid.uuid4().hex[:10]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Anything touching the shared servers is an integration test, marked or not.
    server_fixtures = {"mesh", "pg", "pg_dsn", "redis_server", "redis_url", "clients", "order_path"}
    for item in items:
        if server_fixtures & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def pytest_report_header(config: pytest.Config) -> str:
    return f"meridian harness: latency scale {LATENCY_SCALE}, run dirs under {Path('/tmp')}"

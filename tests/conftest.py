import os
import sys
from pathlib import Path

import pytest

from cluster import LocalCluster


@pytest.fixture(autouse=True, scope="session")
def _no_default_data_dir_in_the_checkout():
    """A Node without data_dir keeps its state in ./raftsync-<host>_<port>: every test must
    pass a temporary data_dir (or ':memory:') so the suite never writes into the checkout."""
    places = {Path.cwd(), Path(__file__).resolve().parent.parent}
    before = {path for place in places for path in place.glob("raftsync-*")}
    yield
    created = {path for place in places for path in place.glob("raftsync-*")} - before
    assert not created, f"a test started a node without data_dir: {sorted(map(str, created))}"


@pytest.fixture
def make_cluster(tmp_path):
    """Factory for LocalCluster; every cluster it made is killed at teardown, pass or fail."""
    made = []

    def make(size=3, **settings):
        settings.setdefault("test_hooks", True)
        cluster = LocalCluster(size, base_dir=tmp_path / f"cluster{len(made)}", **settings)
        made.append(cluster)
        return cluster.start()

    yield make
    for cluster in made:
        cluster.stop()
        if os.environ.get("RAFTSYNC_SHOW_LOGS"):
            for node in cluster.nodes:
                sys.stderr.write(f"--- {node.address} ---\n{node.log_tail(50)}\n")


@pytest.fixture
def cluster(make_cluster):
    return make_cluster(3)


@pytest.fixture
def node(tmp_path):
    """One ready single-member Node (thread engine) with its state under tmp_path."""
    from cluster.launcher import free_ports
    from raftsync import Node

    with Node(f"127.0.0.1:{free_ports(1)[0]}", peers=[], engine="thread", data_dir=tmp_path / "node",
              session_ttl=3) as member:
        member.wait_ready(10)
        yield member

import os
import sys

import pytest

from cluster import LocalCluster


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

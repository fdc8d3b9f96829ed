"""Where a member keeps its Raft state: by default in a directory named after it, so a
restart at the same address remembers its term and vote; memory only when asked for."""

import warnings

import pytest
from pysyncobj.journal import MetaStorer

from cluster.launcher import free_ports
from raftsync import ConfigWarning, Node


def test_by_default_a_member_keeps_term_vote_and_log_in_a_dir_named_after_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    port = free_ports(1)[0]
    address = f"127.0.0.1:{port}"
    # The process engine: its exit frees the port for the restart below at once.
    with Node(address, peers=[], engine="process", session_ttl=3) as node:
        node.wait_ready(10)
        node.data().write("k", b"v")
        first_term = node.status()["term"]
    data_dir = tmp_path / f"raftsync-127.0.0.1_{port}"
    assert (data_dir / "journal.bin").is_file()
    meta = MetaStorer(str(data_dir / "journal.bin.meta")).getMeta()
    assert (meta["currentTerm"], meta["votedForNodeId"]) == (first_term, address)
    with Node(address, peers=[], engine="process", session_ttl=3) as node:
        node.wait_ready(10)
        assert node.data().read("k").value == b"v"
        # It started from the term it remembered: its new election is in a later term.
        assert node.status()["term"] > first_term


def test_memory_only_writes_nothing_and_warns_when_a_group_member_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)  # a group of one: nobody to betray
        with Node(f"127.0.0.1:{free_ports(1)[0]}", peers=[], engine="thread", data_dir=":memory:",
                  session_ttl=3) as node:
            node.wait_ready(10)
            node.data().write("k", b"v")
    address, *peers = [f"127.0.0.1:{port}" for port in free_ports(3)]
    member = Node(address, peers=peers, engine="thread", data_dir=":memory:", session_ttl=3)
    with pytest.warns(ConfigWarning, match="never restart it under the same address"):
        member.start()
    member.close(timeout=0.5)
    assert list(tmp_path.iterdir()) == []

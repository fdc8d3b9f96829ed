"""Where the namespace fault tests cannot run they skip and say why; under CI=true they fail."""

import pytest

import cluster.netns as netns
from tests.integration import netns_util


def test_not_root_is_reported_before_anything_is_tried(monkeypatch):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "needs root" in netns.missing_privileges()


def test_missing_privilege_skips_with_the_reason(monkeypatch):
    monkeypatch.setattr(netns_util, "missing_privileges", lambda: "needs root (creates network namespaces)")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        netns_util.require_namespaces()


def test_missing_privilege_under_ci_is_a_failure(monkeypatch):
    monkeypatch.setattr(netns_util, "missing_privileges", lambda: "needs root (creates network namespaces)")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true.*needs root"):
        netns_util.require_namespaces()


def test_runner_refuses_to_start_without_privileges(monkeypatch, tmp_path):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    cluster = netns.NamespaceCluster(base_dir=tmp_path)
    with pytest.raises(netns.RunnerError, match="needs root"):
        cluster.start()

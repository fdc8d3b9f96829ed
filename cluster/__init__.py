"""Run real raftsync clusters: the local multi-process launcher (tests, demo, bench)."""

from .launcher import AgentError, LocalCluster, NodeProcess

__all__ = ["LocalCluster", "NodeProcess", "AgentError"]

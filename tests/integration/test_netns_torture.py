"""`python -m cluster.torture` runs randomized schedules end to end and reports them."""

import re
import subprocess
import sys

import pytest

from .netns_util import ROOT, require_namespaces


@pytest.mark.slow
def test_torture_runs_randomized_schedules_and_prints_totals(tmp_path):
    require_namespaces()
    result = subprocess.run([sys.executable, "-m", "cluster.torture", "--schedules", "2", "--seed", "11",
                             "--steps", "3", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=110)
    assert result.returncode == 0, result.stdout + result.stderr
    schedules = re.findall(r"^schedule (\d+): (\d+) operations \(kv (\d+), events (\d+), tasks (\d+)\), "
                           r"(\d+) faults .*, 0 violations", result.stdout, re.M)
    assert [s[0] for s in schedules] == ["0", "1"]
    assert all(int(ops) > 0 and int(faults) >= 1 and min(int(kv), int(events), int(tasks)) > 0
               for _, ops, kv, events, tasks, faults in schedules)
    assert re.search(r"^total: 2 schedules, \d+ operations \(.*\), \d+ faults, 0 violations \(seed 11\)$",
                     result.stdout, re.M)
    assert list(tmp_path.iterdir()) == [], "a schedule without violations keeps nothing"

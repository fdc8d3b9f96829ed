"""Group sizes and where a member keeps its Raft state (config only, nothing started)."""

import os

import pytest

from raftsync import ConfigError
from raftsync.config import MEMORY_ONLY, load_config


def _group(voters: int, **settings):
    peers = [f"127.0.0.1:{9002 + i}" for i in range(voters - 1)]
    return load_config({"self_address": "127.0.0.1:9001", "peers": peers, **settings}, {})


@pytest.mark.parametrize("voters", range(1, 10))
def test_any_group_of_one_to_nine_voters_is_accepted_and_even_sizes_warn(voters, tmp_path):
    config = _group(voters, data_dir=str(tmp_path))
    assert len(config.peers) + 1 == voters
    warnings = config.start_warnings()
    if voters % 2:
        assert warnings == []
    else:
        assert len(warnings) == 1 and f"group of {voters} voters" in warnings[0] and "odd" in warnings[0]


def test_ten_voters_are_refused():
    with pytest.raises(ConfigError, match="1 to 9 voters"):
        _group(10)


def test_the_default_data_dir_is_named_after_the_member_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _group(3)
    assert config.data_dir == str(tmp_path / "raftsync-127.0.0.1_9001")
    assert config.engine_config()["data_dir"] == config.data_dir
    assert not config.memory_only and config.start_warnings() == []
    ipv6 = load_config({"self_address": "[::1]:7001"}, {})
    assert os.path.basename(ipv6.data_dir) == "raftsync-__1_7001"
    assert list(tmp_path.iterdir()) == [], "validating a config must not create anything"


def test_memory_only_is_asked_for_the_same_way_everywhere_and_warns_in_a_group(tmp_path):
    toml = tmp_path / "node.toml"
    toml.write_text('self_address = "127.0.0.1:9001"\npeers = ["127.0.0.1:9002", "127.0.0.1:9003"]\n'
                    f'data_dir = "{MEMORY_ONLY}"\n')
    from_argument = _group(3, data_dir=":memory:")
    from_environment = load_config({"self_address": "127.0.0.1:9001", "peers": ["127.0.0.1:9002", "127.0.0.1:9003"]},
                                   {"RAFTSYNC_DATA_DIR": ":memory:"})
    from_toml = load_config({}, {}, str(toml))
    for config in (from_argument, from_environment, from_toml):
        assert config.memory_only
        assert config.engine_config()["data_dir"] is None
        [warning] = config.start_warnings()
        assert "127.0.0.1:9001" in warning and "never restart it under the same address" in warning
    # A group of one has nobody to disagree with: no warning.
    assert _group(1, data_dir=":memory:").start_warnings() == []
    with pytest.raises(ConfigError, match="data_dir"):
        _group(1, data_dir="")

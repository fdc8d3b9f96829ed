import msgpack
import pytest

from raftsync import ConfigError
from raftsync.channel import FrameDecoder, pack_frame
from raftsync.codec import (CODEC_VERSION, MAX_COMMAND_BYTES, Op, decode_command, encode_command)
from raftsync.config import load_config
from raftsync.errors import TooLarge


def test_command_roundtrip_and_size_limit():
    data = encode_command(Op.KV_PUT, 5, 7, 6, ["k", b"v", None])
    assert data[0] == CODEC_VERSION
    assert decode_command(data) == (Op.KV_PUT, 5, 7, 6, ["k", b"v", None])
    with pytest.raises(TooLarge):
        encode_command(Op.KV_PUT, 5, 7, 6, ["k", b"x" * MAX_COMMAND_BYTES, None])


@pytest.mark.parametrize("bad", [b"", b"\x01", b"\x02" + msgpack.packb([1, 1, 1, 1, []]),
                                 b"\x01" + msgpack.packb([1, -1, 1, 1, []]),
                                 b"\x01" + msgpack.packb({"a": 1}), b"\x01\xc1"])
def test_malformed_commands_are_rejected(bad):
    with pytest.raises(Exception):
        decode_command(bad)


def test_frame_decoder_splits_and_limits():
    frames = pack_frame([1, "a"]) + pack_frame([2, b"b"])
    decoder = FrameDecoder()
    out = []
    for i in range(len(frames)):
        out.extend(decoder.feed(frames[i:i + 1]))
    assert out == [[1, "a"], [2, b"b"]]
    with pytest.raises(TooLarge):
        list(FrameDecoder(max_frame=10).feed(b"\x7f\xff\xff\xff"))


def test_config_precedence_and_errors(tmp_path):
    toml = tmp_path / "node.toml"
    toml.write_text('self_address = "127.0.0.1:9001"\npeers = ["127.0.0.1:9002", "127.0.0.1:9003"]\n'
                    'session_ttl = 4.0\n')
    env = {"RAFTSYNC_SESSION_TTL": "6"}
    config = load_config({}, env, str(toml))
    assert config.session_ttl == 6.0 and config.peers == ["127.0.0.1:9002", "127.0.0.1:9003"]
    assert load_config({"session_ttl": 2.0}, env, str(toml)).session_ttl == 2.0
    with pytest.raises(ConfigError, match="self_address"):
        load_config({}, {})
    with pytest.raises(ConfigError, match="password"):
        load_config({"self_address": "10.0.0.1:9001", "peers": ["10.0.0.2:9001", "10.0.0.3:9001"]}, {})
    with pytest.raises(ConfigError, match="peers"):
        load_config({"self_address": "127.0.0.1:9001", "peers": [f"127.0.0.1:{9002 + i}" for i in range(9)]}, {})
    with pytest.raises(ConfigError, match="engine"):
        load_config({"self_address": "127.0.0.1:9001", "engine": "fiber"}, {})
    with pytest.raises(ConfigError, match="session_ttl"):
        load_config({"self_address": "127.0.0.1:9001"}, {"RAFTSYNC_SESSION_TTL": "soon"})
    with pytest.raises(ConfigError, match="bogus"):
        load_config({"self_address": "127.0.0.1:9001", "bogus": 1}, {})
    with pytest.raises(ConfigError, match="self_address"):
        load_config({"self_address": "nohostport"}, {})
    with pytest.raises(ConfigError, match="config_file"):
        load_config({}, {}, str(tmp_path / "missing.toml"))

"""docker-compose.yml is valid compose, describes a working three-member group, and the
runner's compose reader reads it (and the rest of the subset it claims) correctly."""

import shutil
import subprocess
from pathlib import Path

import pytest

from cluster.compose import ComposeError, load_compose
from raftsync.config import load_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture
def project():
    return load_compose(COMPOSE, environ={})


def test_three_members_each_running_raftsync_node_run(project):
    assert sorted(project.services) == ["node1", "node2", "node3"]
    for service in project.services.values():
        assert service.command == ["raftsync", "node", "run"]
        assert service.build is not None and service.image
        assert service.networks == ["raft"]


def test_members_name_each_other_by_service_name(project):
    selves = {name: s.environment["RAFTSYNC_SELF"] for name, s in project.services.items()}
    for name, service in project.services.items():
        assert selves[name].split(":")[0] == name          # resolvable on the compose network
        peers = service.environment["RAFTSYNC_PEERS"].split(",")
        assert sorted(peers) == sorted(a for n, a in selves.items() if n != name)


def test_each_member_keeps_its_data_on_its_own_volume(project):
    sources = []
    for service in project.services.values():
        data_dir = service.environment["RAFTSYNC_DATA_DIR"]
        [mount] = [m for m in service.volumes if m.target == data_dir]
        assert mount.named and mount.source in project.volumes
        sources.append(mount.source)
    assert len(set(sources)) == 3


def test_password_comes_from_the_env_file(project):
    env_file = (ROOT / "compose.env").read_text()
    assert "CHANGE" in env_file.upper()
    [line] = [ln for ln in env_file.splitlines() if ln.startswith("RAFTSYNC_PASSWORD=")]
    for service in project.services.values():
        assert service.environment["RAFTSYNC_PASSWORD"] == line.split("=", 1)[1]
    assert "RAFTSYNC_PASSWORD" not in COMPOSE.read_text().split("services:", 1)[1]


def test_every_member_environment_is_a_valid_node_config(project):
    for service in project.services.values():
        config = load_config({}, environ=service.environment)
        assert config.password and config.data_dir and len(config.peers) == 2


def test_demo_workload_flag_defaults_on_and_can_be_turned_off():
    assert {s.environment["RAFTSYNC_DEMO_WORKLOAD"] for s in load_compose(COMPOSE, {}).services.values()} == {"1"}
    off = load_compose(COMPOSE, {"RAFTSYNC_DEMO_WORKLOAD": "0"})
    assert {s.environment["RAFTSYNC_DEMO_WORKLOAD"] for s in off.services.values()} == {"0"}


def test_dockerfile_runs_a_member_with_its_data_on_a_volume():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["raftsync", "node", "run"]' in dockerfile
    assert 'VOLUME ["/var/lib/raftsync"]' in dockerfile
    for needed in ("COPY raftsync", "COPY cluster", "pip install ."):
        assert needed in dockerfile


def _compose_cli():
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def test_docker_compose_itself_accepts_the_file():
    """Compose's own schema validation, where a compose CLI is installed (it needs no engine)."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no docker-compose / docker compose CLI here; the file is checked by our reader only")
    result = subprocess.run([*cli, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                            timeout=60, env={"PATH": "/usr/local/bin:/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr


# -- the reader's subset -------------------------------------------------------------------------


def _write(tmp_path, text, name="docker-compose.yml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_interpolation_forms(tmp_path):
    (tmp_path / ".env").write_text("FROM_DOTENV=dot\n")
    path = _write(tmp_path, """
services:
  a:
    image: x
    command: "run --flag '${UNSET:-a b}'"
    environment:
      PLAIN: ${SET}
      DEFAULT_EMPTY: ${EMPTY:-fallback}
      DASH_EMPTY: ${EMPTY-kept}
      BARE: $SET/x
      DOLLAR: $$HOME
      DOT: ${FROM_DOTENV}
""")
    service = load_compose(path, {"SET": "s", "EMPTY": ""}).services["a"]
    assert service.command == ["run", "--flag", "a b"]
    assert service.environment == {"PLAIN": "s", "DEFAULT_EMPTY": "fallback", "DASH_EMPTY": "", "BARE": "s/x",
                                   "DOLLAR": "$HOME", "DOT": "dot"}


def test_required_variable_missing(tmp_path):
    path = _write(tmp_path, "services:\n  a:\n    image: x\n    command: [x]\n    environment: {A: '${NEED:?set it}'}\n")
    with pytest.raises(ComposeError, match="NEED is required"):
        load_compose(path, {})


def test_environment_list_env_file_precedence_and_long_volume_syntax(tmp_path):
    (tmp_path / "a.env").write_text("# comment\nA=from-file\nB='quoted'\nexport C=c\n")
    path = _write(tmp_path, """
services:
  a:
    build: .
    command: [python, -c, pass]
    env_file: [a.env, {path: missing.env, required: false}]
    environment: [A=inline, PASSED]
    volumes:
      - type: volume
        source: data
        target: /data/
      - ./host:/host:ro
volumes: {data: {}}
""")
    service = load_compose(path, {"PASSED": "p"}).services["a"]
    assert service.environment == {"A": "inline", "B": "quoted", "C": "c", "PASSED": "p"}
    assert [(m.source, m.target, m.named) for m in service.volumes] == [
        ("data", "/data", True), (str(tmp_path / "host"), "/host", False)]


@pytest.mark.parametrize("text, message", [
    ("services: {}\n", "non-empty 'services'"),
    ("services:\n  a: {command: [x]}\n", "needs 'image' or 'build'"),
    ("services:\n  a: {image: x}\n", "needs a 'command'"),
    ("services:\n  a: {image: x, command: [x], volumes: ['v:/d']}\n", "not declared under top-level 'volumes'"),
    ("services:\n  a: {image: x, command: [x], volumes: ['/d']}\n", "anonymous volume"),
    ("services:\n  a: {image: x, command: [x], networks: [n]}\n", "not declared under top-level 'networks'"),
    ("services:\n  a: {image: x, command: [x], env_file: nope.env}\n", "does not exist"),
    ("services:\n  a: [\n", "not valid YAML"),
])
def test_what_the_reader_refuses(tmp_path, text, message):
    with pytest.raises(ComposeError, match=message):
        load_compose(_write(tmp_path, text), {})

"""Read a docker-compose file into what the namespace runner needs to start its services.

The subset of the Compose specification that a member service uses: ``services`` with
``image``/``build``, ``command`` (list or string), ``environment`` (map or list),
``env_file`` (string, list, or list of ``{path, required}``), ``volumes`` (short
``source:target[:mode]`` or long syntax), ``networks`` (list or map), ``hostname``;
top-level ``volumes`` and ``networks``; ``x-*`` extension fields and YAML merge keys;
``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``$VAR`` and ``$$`` interpolation
from the environment and the project's ``.env``. Anything else of the specification is
accepted and ignored; a file this subset cannot make sense of raises ComposeError.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ComposeError(Exception):
    """The compose file is not something the runner can start."""


@dataclass(frozen=True)
class Mount:
    """A service's volume: a named volume or a host path, mounted at ``target``."""

    source: str
    target: str
    named: bool


@dataclass
class Service:
    name: str
    command: list[str]
    environment: dict[str, str]
    volumes: list[Mount] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)
    hostname: str | None = None
    image: str | None = None
    build: Any = None


@dataclass
class ComposeProject:
    path: Path
    services: dict[str, Service]
    volumes: list[str]
    networks: list[str]

    @property
    def directory(self) -> Path:
        return self.path.parent


_SERVICE_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")


def load_compose(path: str | os.PathLike, environ: dict[str, str] | None = None) -> ComposeProject:
    """Parse, interpolate and check ``path``; ``environ`` defaults to ``os.environ``."""
    path = Path(path).resolve()
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ComposeError(f"cannot read {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ComposeError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("services"), dict) or not document["services"]:
        raise ComposeError(f"{path}: a compose file needs a non-empty 'services' map")
    variables = _dotenv(path.parent / ".env")
    variables.update(os.environ if environ is None else environ)
    document = _interpolate(document, variables, "")
    volumes = _names(document.get("volumes"), "volumes")
    networks = _names(document.get("networks"), "networks")
    services = {}
    for name, spec in document["services"].items():
        services[name] = _service(str(name), spec, path.parent, variables, volumes, networks)
    return ComposeProject(path, services, volumes, networks)


def _names(section: Any, what: str) -> list[str]:
    if section is None:
        return []
    if not isinstance(section, dict):
        raise ComposeError(f"top-level '{what}' must be a map")
    return [str(name) for name in section]


def _service(name: str, spec: Any, directory: Path, variables: dict[str, str], volumes: list[str],
             networks: list[str]) -> Service:
    where = f"service {name!r}"
    if not _SERVICE_NAME.match(name):
        raise ComposeError(f"{where}: invalid service name")
    if not isinstance(spec, dict):
        raise ComposeError(f"{where}: must be a map")
    if "image" not in spec and "build" not in spec:
        raise ComposeError(f"{where}: needs 'image' or 'build'")
    command = spec.get("command")
    if isinstance(command, str):
        command = shlex.split(command)
    if not isinstance(command, list) or not command or not all(isinstance(a, (str, int, float)) for a in command):
        raise ComposeError(f"{where}: needs a 'command' (the runner has no image to take one from)")
    environment: dict[str, str] = {}
    for env_file in _env_files(spec.get("env_file"), where):
        file_path = (directory / env_file["path"]).resolve()
        if file_path.exists():
            environment.update(_dotenv(file_path))
        elif env_file["required"]:
            raise ComposeError(f"{where}: env_file {file_path} does not exist")
    environment.update(_environment(spec.get("environment"), variables, where))
    mounts = [_mount(entry, directory, where) for entry in spec.get("volumes") or []]
    for mount in mounts:
        if mount.named and mount.source not in volumes:
            raise ComposeError(f"{where}: volume {mount.source!r} is not declared under top-level 'volumes'")
    service_networks = spec.get("networks") or []
    if isinstance(service_networks, dict):
        service_networks = list(service_networks)
    if not isinstance(service_networks, list):
        raise ComposeError(f"{where}: 'networks' must be a list or a map")
    for network in service_networks:
        if network not in networks:
            raise ComposeError(f"{where}: network {network!r} is not declared under top-level 'networks'")
    hostname = spec.get("hostname")
    return Service(name, [str(a) for a in command], environment, mounts, [str(n) for n in service_networks],
                   str(hostname) if hostname else None, spec.get("image"), spec.get("build"))


def _env_files(value: Any, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    entries = value if isinstance(value, list) else [value]
    result = []
    for entry in entries:
        if isinstance(entry, str):
            result.append({"path": entry, "required": True})
        elif isinstance(entry, dict) and isinstance(entry.get("path"), str):
            result.append({"path": entry["path"], "required": bool(entry.get("required", True))})
        else:
            raise ComposeError(f"{where}: bad env_file entry {entry!r}")
    return result


def _environment(value: Any, variables: dict[str, str], where: str) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): ("" if v is None else _scalar(v)) for k, v in value.items()}
    if isinstance(value, list):
        result = {}
        for item in value:
            if not isinstance(item, str):
                raise ComposeError(f"{where}: bad environment entry {item!r}")
            key, sep, val = item.partition("=")
            if sep:
                result[key] = val
            elif key in variables:  # "KEY" alone: passed through from the environment
                result[key] = variables[key]
        return result
    raise ComposeError(f"{where}: 'environment' must be a map or a list")


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _mount(entry: Any, directory: Path, where: str) -> Mount:
    if isinstance(entry, str):
        parts = entry.split(":")
        if len(parts) < 2:
            raise ComposeError(f"{where}: anonymous volume {entry!r}: give it a name or a host path")
        source, target = parts[0], parts[1]
    elif isinstance(entry, dict) and entry.get("source") and entry.get("target"):
        source, target = str(entry["source"]), str(entry["target"])
    else:
        raise ComposeError(f"{where}: bad volume entry {entry!r}")
    if not target.startswith("/"):
        raise ComposeError(f"{where}: volume target {target!r} must be an absolute path")
    named = not source.startswith((".", "/", "~"))
    if not named:
        source = str((directory / os.path.expanduser(source)).resolve())
    return Mount(source, target.rstrip("/") or "/", named)


def _dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; '#' comments and blank lines ignored; one pair of quotes stripped."""
    result: dict[str, str] = {}
    if not path.exists():
        return result
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):]
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        result[key.strip()] = value
    return result


def _interpolate(node: Any, variables: dict[str, str], where: str) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, variables, f"{where}.{k}") for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, variables, where) for v in node]
    if isinstance(node, str):
        return _VARIABLE.sub(lambda m: _substitute(m, variables, where), node)
    return node


def _substitute(match: re.Match, variables: dict[str, str], where: str) -> str:
    if match.group("escaped"):
        return "$"
    if match.group("named"):
        return variables.get(match.group("named"), "")
    expression = match.group("braced")
    found = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])(.*))?$", expression, re.S)
    if not found:
        raise ComposeError(f"{where.lstrip('.')}: bad interpolation ${{{expression}}}")
    name, operator, argument = found.groups()
    value = variables.get(name)
    if operator is None:
        return value or ""
    empty_counts = operator.startswith(":")
    missing = value is None or (empty_counts and value == "")
    if operator.endswith("-"):
        return argument if missing else value
    if missing:  # ${VAR:?message}
        raise ComposeError(f"{where.lstrip('.')}: {name} is required: {argument}")
    return value

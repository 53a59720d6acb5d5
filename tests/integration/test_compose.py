"""docker-compose.yml and the Dockerfile agree with the real command line and settings.

No Docker engine is needed: both files are parsed, and every command a container would
run goes through the same argument parser as `conveyor` itself.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections import Counter
from typing import Any

import pytest
import yaml

from conveyor.cli.main import build_parser
from conveyor.config import POOLS, Settings
from tests.support import ROOT

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PREFIX = "CONVEYOR_"
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}
INTERPOLATION = re.compile(
    r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
)
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN")


def load_compose() -> dict[str, Any]:
    """The compose file as data (anchors and merge keys resolved)."""
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    """Every service by name."""
    found: dict[str, dict[str, Any]] = load_compose()["services"]
    return found


def app_services() -> dict[str, dict[str, Any]]:
    """The services that run this project's image, i.e. the `conveyor` command."""
    return {name: svc for name, svc in services().items() if "build" in svc}


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment, whether written as a mapping or as a list of NAME=value."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def command(service: dict[str, Any]) -> list[str]:
    """A service's command as argv, whether written as a list or a string."""
    cmd = service.get("command")
    assert cmd, "an app service must say which conveyor subcommand it runs"
    return shlex.split(cmd) if isinstance(cmd, str) else [str(part) for part in cmd]


def parse(argv: list[str]) -> Any:
    """Parse argv exactly as `conveyor` would; a bad or help-only argv fails the test."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"`conveyor {' '.join(argv)}` is not a runnable command (exit {exit_.code})")


def interpolate(text: str) -> str:
    """Resolve compose ${...} references with stand-in values, as if the user set them all."""
    return INTERPOLATION.sub(lambda m: f"set-{m['name'].lower().replace('_', '-')}", text)


def settings_from(env: dict[str, str]) -> Settings:
    """The Settings a container with this environment would load (no .env, no shell)."""
    values = {
        name.removeprefix(PREFIX).lower(): interpolate(value)
        for name, value in env.items()
        if name.startswith(PREFIX)
    }
    return Settings(_env_file=None, **values)


@pytest.fixture(autouse=True)
def _no_conveyor_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings built here come from the compose file alone."""
    for name in list(os.environ):
        if name.startswith(PREFIX):
            monkeypatch.delenv(name)


def test_compose_has_every_part_of_the_platform() -> None:
    names = set(services())
    assert {"redis", "postgres", "migrate", "api", "beat", "flower"} <= names
    subcommands = Counter(parse(command(svc)).command for svc in app_services().values())
    assert subcommands["api"] >= 1
    assert subcommands["beat"] == 1, "exactly one beat, or schedules fire twice"
    assert subcommands["flower"] == 1
    assert subcommands["migrate"] == 1


def test_every_app_command_is_a_real_conveyor_subcommand() -> None:
    apps = app_services()
    assert set(apps) >= {"migrate", "api", "worker-high", "worker-default", "worker-low", "beat"}
    for name, svc in apps.items():
        argv = command(svc)
        assert argv[0] != "conveyor", f"{name}: the image's ENTRYPOINT already is `conveyor`"
        assert "entrypoint" not in svc, f"{name} must use the image's ENTRYPOINT"
        parse(argv)


def test_one_worker_per_pool() -> None:
    pools: list[str] = []
    for name, svc in app_services().items():
        args = parse(command(svc))
        if args.command == "worker":
            assert args.pool is not None, f"{name}: a worker serves one named pool"
            assert args.queues is None
            pools.append(args.pool)
    assert sorted(pools) == sorted(POOLS)
    assert Counter(pools) == Counter(POOLS)


def test_every_conveyor_variable_is_a_real_setting_and_valid() -> None:
    fields = set(Settings.model_fields)
    for name, svc in services().items():
        env = environment(svc)
        for variable in env:
            if variable.startswith(PREFIX):
                field = variable.removeprefix(PREFIX).lower()
                assert field in fields, f"{name}: {variable} is not a Conveyor setting"
    for name, svc in app_services().items():
        settings = settings_from(environment(svc))
        assert settings.database_url.startswith("postgresql+psycopg://"), name
        assert "@postgres:5432/" in settings.database_url, name
        assert settings.broker_url.startswith("redis://redis:6379/"), name
        assert not settings.embedded, name


def test_listening_services_bind_all_interfaces_inside_the_container() -> None:
    for name, svc in app_services().items():
        if parse(command(svc)).command in ("api", "flower"):
            assert settings_from(environment(svc)).api_host == "0.0.0.0", name


def test_secrets_come_from_the_environment_with_no_default() -> None:
    required = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*:?\?[^}]+\}$")
    flower = environment(services()["flower"])
    for variable in ("CONVEYOR_FLOWER_USER", "CONVEYOR_FLOWER_PASSWORD"):
        assert required.match(flower.get(variable, "")), f"{variable} must be ${{{variable}:?…}}"
    assert settings_from(flower).flower_password == "set-conveyor-flower-password"

    for name, svc in services().items():
        for variable, value in environment(svc).items():
            if any(word in variable for word in SECRET_WORDS):
                assert required.match(value), f"{name}: {variable} has a literal or default value"
        for value in environment(svc).values():
            for ref in INTERPOLATION.finditer(value):
                if any(word in ref["name"] for word in SECRET_WORDS):
                    assert ref["op"] in (":?", "?"), f"{name}: ${{{ref['name']}}} needs :?"
    for name, svc in app_services().items():
        url = environment(svc)["CONVEYOR_DATABASE_URL"]
        password = url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
        assert required.match(password), f"{name}: the database password must not be literal"


def test_services_wait_for_what_they_need() -> None:
    all_services = services()
    for backing in ("redis", "postgres"):
        assert all_services[backing].get("healthcheck", {}).get("test"), backing
    assert all_services["migrate"].get("restart", "no") == "no"
    for name, svc in app_services().items():
        depends = svc.get("depends_on")
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        assert depends["postgres"]["condition"] == "service_healthy", name
        if name == "migrate":
            continue
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["migrate"]["condition"] == "service_completed_successfully", name


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def exec_form(instructions: list[tuple[str, str]], keyword: str) -> list[str]:
    """The last ENTRYPOINT or CMD, which must be in exec (JSON array) form."""
    values = [rest for kw, rest in instructions if kw == keyword]
    assert values, f"the Dockerfile has no {keyword}"
    parsed = json.loads(values[-1])
    assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed), keyword
    return parsed


def test_dockerfile_entrypoint_matches_how_compose_commands_are_written() -> None:
    instructions = dockerfile_instructions()
    assert exec_form(instructions, "ENTRYPOINT") == ["conveyor"]
    parse(exec_form(instructions, "CMD"))
    for name, svc in app_services().items():
        build = svc["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        assert (COMPOSE.parent / context).resolve() == DOCKERFILE.parent, name


def test_dockerfile_caches_dependencies_runs_unprivileged_and_bakes_no_secrets() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0][0] == "FROM" and instructions[0][1].startswith("python:3.11-slim")
    order = [f"{kw} {rest}" for kw, rest in instructions]

    def first(pattern: str) -> int:
        for index, text in enumerate(order):
            if re.search(pattern, text):
                return index
        pytest.fail(f"the Dockerfile has no instruction matching {pattern!r}")

    pip_uv = first(r"^RUN .*pip install .*\buv\b")
    lock = first(r"^COPY .*pyproject\.toml.*uv\.lock")
    deps = first(r"^RUN .*uv sync --frozen .*--no-dev")
    code = first(r"^COPY .*\bconveyor\b")
    assert pip_uv < deps and lock < deps < code, "dependencies must be installed before code"
    assert "--no-install-project" in order[deps]

    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "must run as non-root"

    for kw, rest in instructions:
        if kw in ("ENV", "ARG"):
            for assignment in shlex.split(rest):
                name = assignment.split("=", 1)[0]
                assert not any(word in name.upper() for word in SECRET_WORDS), name
                if name.startswith(PREFIX):
                    assert name.removeprefix(PREFIX).lower() in Settings.model_fields, name
    assert not any(
        kw == "COPY" and re.search(r"(^|\s)\.env\b|(^|\s)\.(\s|$)", rest)
        for kw, rest in instructions
    ), "copying .env or the whole context could bake local secrets into the image"

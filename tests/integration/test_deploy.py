"""The monitoring files under deploy/ are valid and agree with the metrics and with compose.

Prometheus' own checker (promtool, Debian package `prometheus`) validates the scrape
config, the alert rules and their unit tests; the rest is parsed here: every metric and
label that alerts and dashboard use must be one the platform exports, the dashboard must
point at the provisioned data source, and compose must mount what the configs refer to.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from conveyor.config import POOLS, Settings
from tests.integration.test_compose import command, environment, parse, services
from tests.support import ROOT

DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
GRAFANA = DEPLOY / "grafana"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "conveyor.yml"
DASHBOARD = GRAFANA / "dashboards" / "conveyor.json"
GRAFANA_PROVISIONING_PATH = PurePosixPath("/etc/grafana/provisioning")
DEFAULT_METRICS_PORT = 9101

Labels = dict[str, frozenset[str] | None]

QUEUES = frozenset({"high", "default", "low"})
FINISHED = frozenset({"succeeded", "dead", "cancelled"})
WAITING = frozenset({"pending", "queued", "scheduled", "retrying", "running"})
WORKFLOW_STATES = frozenset({"running", "succeeded", "failed", "cancelled"})
SIGNALS = frozenset({"failure_rate", "run_p95", "wait_p95"})

# What the platform exports: metric name -> its labels, each with its allowed values
# (None: any value). Histograms are listed by base name and expanded below.
COUNTERS_AND_GAUGES: dict[str, Labels] = {
    "conveyor_jobs_submitted_total": {"task": None, "queue": QUEUES},
    "conveyor_jobs_finished_total": {"task": None, "queue": QUEUES, "state": FINISHED},
    "conveyor_jobs_started_total": {"task": None, "queue": QUEUES},
    "conveyor_jobs_retried_total": {"task": None},
    "conveyor_jobs_deferred_total": {"task": None, "reason": None},
    "conveyor_http_requests_total": {"method": None, "route": None, "status": None},
    "conveyor_queue_depth": {"queue": QUEUES},
    "conveyor_jobs_waiting": {"queue": QUEUES, "state": WAITING},
    "conveyor_dead_jobs": {"task": None},
    "conveyor_oldest_queued_seconds": {"queue": QUEUES},
    "conveyor_anomaly": {"task": None, "signal": SIGNALS},
    "conveyor_workflows_submitted_total": {},
    "conveyor_workflows": {"state": WORKFLOW_STATES},
    "conveyor_worker_consuming": {"queue": QUEUES},
    "conveyor_beat_leader": {},
    "conveyor_beat_ticks_total": {},
    "conveyor_schedule_fired_total": {"schedule": None},
    # Written by Prometheus itself for every scrape target.
    "up": {},
}
HISTOGRAMS: dict[str, Labels] = {
    "conveyor_http_request_seconds": {"method": None, "route": None},
    "conveyor_job_run_seconds": {"task": None},
    "conveyor_job_queue_wait_seconds": {"queue": QUEUES},
}


def _expected_metrics() -> dict[str, Labels]:
    """Every series name that can be queried, histograms as _bucket (with le), _sum, _count."""
    metrics = dict(COUNTERS_AND_GAUGES)
    for base, labels in HISTOGRAMS.items():
        metrics[f"{base}_bucket"] = {**labels, "le": None}
        metrics[f"{base}_sum"] = labels
        metrics[f"{base}_count"] = labels
    return metrics


METRICS = _expected_metrics()

PROMQL_KEYWORDS = frozenset(
    {"by", "without", "and", "or", "unless", "on", "ignoring", "group_left", "group_right"}
    | {"bool", "offset", "inf", "nan"}
)
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
SELECTOR = re.compile(r"(?<![\w:])([A-Za-z_:][\w:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
IDENTIFIER = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?")
GRAFANA_INTERVAL = re.compile(r"\$__\w+")
GRAFANA_VARIABLE = re.compile(r"\$\{?(\w+)\}?")


def load_yaml(path: Path) -> Any:
    """A YAML file as data."""
    return yaml.safe_load(path.read_text())


def prometheus_config() -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml as data."""
    config: dict[str, Any] = load_yaml(PROMETHEUS_CONFIG)
    return config


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule in alerts.yml."""
    groups = load_yaml(ALERTS)["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    """The Conveyor dashboard as data."""
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


def dashboard_panels() -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> list[str]:
    """The PromQL of every panel target."""
    return [
        target["expr"]
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def target_labels() -> set[str]:
    """Labels Prometheus attaches to every series: job, instance and the static ones."""
    labels = {"job", "instance"}
    for scrape in prometheus_config()["scrape_configs"]:
        for static in scrape.get("static_configs", []):
            labels.update(static.get("labels", {}))
        for relabel in scrape.get("relabel_configs", []):
            labels.add(relabel["target_label"])
    return labels


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (functions, keywords and labels left out)."""
    text = STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = GROUPING.sub("", text)
    names = set()
    for match in IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if not call and name.lower() not in PROMQL_KEYWORDS:
            names.add(name)
    return names


def problems_in(expr: str, extra_labels: set[str]) -> list[str]:
    """What in one expression does not match the exported metrics and their labels."""
    problems = []
    names = metric_names(expr)
    for name in sorted(names - set(METRICS)):
        problems.append(f"unknown metric {name}")
    for name, matchers in SELECTOR.findall(expr):
        if name not in METRICS:
            continue
        for label, op, value in MATCHER.findall(matchers):
            allowed = METRICS[name]
            if label not in allowed and label not in extra_labels:
                problems.append(f"{name} has no label {label}")
            elif op == "=" and (values := allowed.get(label)) and value not in values:
                problems.append(f'{name}{{{label}="{value}"}} never exists')
    known = set().union(*(METRICS[n] for n in names & set(METRICS))) | extra_labels
    for group in GROUPING.findall(STRING.sub('""', expr)):
        for label in filter(None, (part.strip() for part in group.split(","))):
            if label not in known:
                problems.append(f"grouping by {label}, which no metric here has")
    return problems


# --- promtool -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    """Path of promtool; its absence is a failure, since nothing else checks these files."""
    found = shutil.which("promtool") or (
        "/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None
    )
    if found is None:
        pytest.fail(
            "promtool is missing: install Debian's prometheus package "
            "(apt-get install prometheus); .ci/run does this when apt-get is available"
        )
    return found


def run_promtool(promtool: str, *args: str, cwd: Path | None = None) -> str:
    """Run promtool and fail with its output unless it succeeds."""
    result = subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def test_prometheus_config_is_valid_with_its_rule_files(promtool: str) -> None:
    rule_files = prometheus_config()["rule_files"]
    assert rule_files == ["alerts.yml"], "rule files are relative to the config's directory"
    output = run_promtool(promtool, "check", "config", str(PROMETHEUS_CONFIG))
    assert "1 rule files found" in output


def test_alert_rules_are_valid(promtool: str) -> None:
    run_promtool(promtool, "check", "rules", str(ALERTS))


def test_alert_unit_tests_pass(promtool: str) -> None:
    run_promtool(promtool, "test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    rules = [
        {
            "record": f"dashboard:query_{index}",
            "expr": GRAFANA_VARIABLE.sub(".*", GRAFANA_INTERVAL.sub("5m", expr)),
        }
        for index, expr in enumerate(dashboard_exprs())
    ]
    assert rules, "the dashboard has no queries"
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool(promtool, "check", "rules", str(path))


# --- alerts ---------------------------------------------------------------------------------


def test_every_alert_is_actionable() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in rules:
        name = rule["alert"]
        assert name.startswith("Conveyor"), name
        assert rule.get("labels", {}).get("severity") in ("critical", "warning", "info"), name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), f"{name} needs a summary"
        assert len(annotations.get("description", "")) > 80, f"{name} needs a description"


def test_the_expected_alerts_exist() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    wanted = {
        "ConveyorQueueBacklogGrowing": "conveyor_queue_depth",
        "ConveyorTaskFailureRateHigh": "conveyor_jobs_finished_total",
        "ConveyorDeadJobsIncreasing": "conveyor_dead_jobs",
        "ConveyorNoWorkerConsuming": "conveyor_worker_consuming",
        "ConveyorBeatLeaderMissing": "conveyor_beat_leader",
        "ConveyorTaskAnomaly": "conveyor_anomaly",
        "ConveyorTargetDown": "up",
    }
    for alert, metric in wanted.items():
        assert alert in exprs, f"missing alert {alert}"
        assert metric in metric_names(exprs[alert]), alert
    for queue in QUEUES:
        assert f'absent(conveyor_worker_consuming{{queue="{queue}"}})' in " ".join(
            exprs["ConveyorNoWorkerConsuming"].split()
        ), f"a queue nobody reports on ({queue}) must raise ConveyorNoWorkerConsuming too"


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(ALERT_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fired == set(), "alerts with no test where they fire"
    assert names - quiet == set(), "alerts with no test where they stay quiet"


def test_alerts_and_their_tests_use_only_exported_metrics() -> None:
    extra = target_labels()
    problems = [
        f"{rule['alert']}: {problem}"
        for rule in alert_rules()
        for problem in problems_in(rule["expr"], extra)
    ]
    for case in load_yaml(ALERT_TESTS)["tests"]:
        for series in case.get("input_series", []):
            problems += [
                f"test series {series['series']}: {p}" for p in problems_in(series["series"], extra)
            ]
    assert problems == []


# --- dashboard ------------------------------------------------------------------------------


def provisioned_datasource() -> dict[str, Any]:
    """The one Prometheus data source Grafana is provisioned with."""
    sources = [s for s in load_yaml(DATASOURCES)["datasources"] if s["type"] == "prometheus"]
    assert len(sources) == 1
    source: dict[str, Any] = sources[0]
    assert source.get("uid"), "the data source needs a fixed uid for dashboards to name"
    return source


def test_dashboard_uses_only_exported_metrics_and_defined_variables() -> None:
    board = dashboard()
    variables = {v["name"] for v in board["templating"]["list"]}
    extra = target_labels()
    problems = []
    for expr in dashboard_exprs():
        problems += [f"{expr}: {p}" for p in problems_in(expr, extra)]
        for name in GRAFANA_VARIABLE.findall(GRAFANA_INTERVAL.sub("", expr)):
            if name not in variables:
                problems.append(f"{expr}: undefined variable ${name}")
    for variable in board["templating"]["list"]:
        found = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
        assert found, variable["name"]
        metric, label = found.groups()
        if metric not in METRICS or label not in METRICS[metric]:
            problems.append(f"variable {variable['name']}: {metric} has no label {label}")
    assert problems == []


def test_dashboard_shows_every_exported_metric() -> None:
    used = set().union(*(metric_names(expr) for expr in dashboard_exprs()))
    bases = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    missing = (set(COUNTERS_AND_GAUGES) | set(HISTOGRAMS)) - bases
    assert missing == set()
    for base in HISTOGRAMS:
        assert f"{base}_bucket" in used, f"{base} should be shown as quantiles"
    assert any("histogram_quantile(0.99," in expr for expr in dashboard_exprs())


def test_dashboard_is_well_formed_grafana_json() -> None:
    board = dashboard()
    assert board.get("uid") and board.get("title")
    assert isinstance(board.get("schemaVersion"), int) and board["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard_panels():
        grid = panel["gridPos"]
        x, y, w, h = grid["x"], grid["y"], grid["w"], grid["h"]
        assert w > 0 and h > 0 and x >= 0 and x + w <= 24, panel["title"]
        for cell in ((col, row) for col in range(x, x + w) for row in range(y, y + h)):
            assert cell not in cells, f"{panel['title']} overlaps {cells[cell]}"
            cells[cell] = panel["title"]
        if panel["type"] == "row":
            continue
        targets = panel.get("targets")
        assert targets, f"{panel['title']} has no query"
        refs = [target["refId"] for target in targets]
        assert len(refs) == len(set(refs)), panel["title"]
        assert all(target.get("expr") for target in targets), panel["title"]


def test_dashboard_points_at_the_provisioned_datasource() -> None:
    uid = provisioned_datasource()["uid"]
    board = dashboard()
    seen = 0
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == uid, panel["title"]
            seen += 1
    for variable in board["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid, variable["name"]
    assert seen > 0


# --- compose --------------------------------------------------------------------------------


def bind_mounts(service: dict[str, Any]) -> dict[PurePosixPath, tuple[Path, bool]]:
    """A service's bind mounts: container path -> (path in the repository, read-only)."""
    mounts = {}
    for volume in service.get("volumes", []):
        assert isinstance(volume, str), "volumes are written in the short form"
        source, target, *mode = volume.split(":")
        if source.startswith((".", "/")):
            mounts[PurePosixPath(target)] = ((ROOT / source).resolve(), mode == ["ro"])
    return mounts


def host_path(service: dict[str, Any], inside: PurePosixPath) -> Path | None:
    """The repository path a container path comes from, through the deepest bind mount."""
    best: tuple[PurePosixPath, Path] | None = None
    for target, (source, _) in bind_mounts(service).items():
        if (inside == target or target in inside.parents) and (
            best is None or len(target.parts) > len(best[0].parts)
        ):
            best = (target, source)
    if best is None:
        return None
    return best[1].joinpath(*inside.relative_to(best[0]).parts)


def flag(service: dict[str, Any], name: str) -> str:
    """The value of a --name=value flag in a service's command."""
    for part in service.get("command", []):
        if part.startswith(f"--{name}="):
            return str(part.split("=", 1)[1])
    pytest.fail(f"the command does not set --{name}")


def published_container_ports(service: dict[str, Any]) -> set[int]:
    """Container ports a service publishes, each required to bind loopback only."""
    ports = set()
    for mapping in service.get("ports", []):
        host_ip, _, container = str(mapping).split(":")
        assert host_ip == "127.0.0.1", f"{mapping} must bind 127.0.0.1 only"
        ports.add(int(container))
    return ports


@pytest.mark.parametrize("name", ["prometheus", "grafana"])
def test_monitoring_services_use_pinned_images_and_read_only_repository_mounts(
    name: str,
) -> None:
    service = services()[name]
    assert "build" not in service, f"{name} runs an upstream image, not this project's"
    image = service["image"]
    assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name}: pin a version: {image}"
    mounts = bind_mounts(service)
    assert mounts, f"{name} mounts nothing from the repository"
    for target, (source, read_only) in mounts.items():
        assert source.exists(), f"{name} mounts {source}, which does not exist"
        assert DEPLOY in source.parents, f"{name} mounts {source} from outside deploy/"
        assert read_only, f"{name} must mount {target} read-only"
    assert published_container_ports(service), f"{name} publishes no port"


def test_prometheus_container_finds_its_config_and_rules() -> None:
    service = services()["prometheus"]
    config = PurePosixPath(flag(service, "config.file"))
    assert host_path(service, config) == PROMETHEUS_CONFIG
    for rule_file in prometheus_config()["rule_files"]:
        inside = config.parent / rule_file
        assert host_path(service, inside) == ALERTS, f"{inside} is not alerts.yml"
    assert 9090 in published_container_ports(service)


def test_grafana_container_finds_its_provisioning_and_dashboards() -> None:
    service = services()["grafana"]
    env = environment(service)
    provisioning = PurePosixPath(env.get("GF_PATHS_PROVISIONING", str(GRAFANA_PROVISIONING_PATH)))
    assert host_path(service, provisioning / "datasources" / DATASOURCES.name) == DATASOURCES
    providers = host_path(service, provisioning / "dashboards" / DASHBOARD_PROVIDERS.name)
    assert providers == DASHBOARD_PROVIDERS
    for provider in load_yaml(DASHBOARD_PROVIDERS)["providers"]:
        assert provider["type"] == "file"
        folder = host_path(service, PurePosixPath(provider["options"]["path"]))
        assert folder == DASHBOARD.parent, "the dashboard provider reads an unmounted path"
    assert DASHBOARD in DASHBOARD.parent.glob("*.json")

    url = provisioned_datasource()["url"]
    found = re.fullmatch(r"http://([\w-]+):(\d+)/?", url)
    assert found, url
    assert found[1] in services() and found[1] == "prometheus", url
    assert int(found[2]) in published_container_ports(services()[found[1]]), url
    assert 3000 in published_container_ports(service)


def test_grafana_has_no_default_secret_and_no_anonymous_access() -> None:
    env = environment(services()["grafana"])
    password = env.get("GF_SECURITY_ADMIN_PASSWORD", "")
    assert re.fullmatch(r"\$\{[A-Za-z_]\w*:\?[^}]+\}", password), "no default admin password"
    assert env.get("GF_AUTH_ANONYMOUS_ENABLED", "").lower() == "false"


def metrics_ports() -> dict[str, int]:
    """Where each API, worker and beat container serves /metrics, by compose service."""
    api_default = Settings.model_fields["api_port"].default
    field = Settings.model_fields.get("metrics_port")
    metrics_default = field.default if field is not None else DEFAULT_METRICS_PORT
    ports = {}
    for name, service in services().items():
        if "build" not in service:
            continue
        subcommand = parse(command(service)).command
        env = environment(service)
        if subcommand == "api":
            ports[name] = int(env.get("CONVEYOR_API_PORT", api_default))
        elif subcommand in ("worker", "beat"):
            ports[name] = int(env.get("CONVEYOR_METRICS_PORT", metrics_default))
    return ports


def scrape_targets() -> dict[str, tuple[str, int, dict[str, str]]]:
    """Every Conveyor scrape target: service -> (job name, port, static labels)."""
    targets = {}
    for scrape in prometheus_config()["scrape_configs"]:
        if not scrape["job_name"].startswith("conveyor-"):
            continue
        assert scrape.get("metrics_path", "/metrics") == "/metrics", scrape["job_name"]
        for static in scrape.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                assert host not in targets, f"{host} is scraped twice"
                targets[host] = (scrape["job_name"], int(port), static.get("labels", {}))
        for found in scrape.get("dns_sd_configs", []):
            assert found.get("type") == "A", "compose service names resolve to A records"
            for host in found["names"]:
                assert host not in targets, f"{host} is scraped twice"
                targets[host] = (scrape["job_name"], int(found["port"]), relabelled(scrape, host))
    return targets


def relabelled(scrape: dict[str, Any], name: str) -> dict[str, str]:
    """The labels a scrape's relabelling gives a target found by the DNS name `name`."""
    labels: dict[str, str] = {}
    for rule in scrape.get("relabel_configs", []):
        sources = rule.get("source_labels")
        if not sources:
            labels[rule["target_label"]] = rule["replacement"]
            continue
        assert sources == ["__meta_dns_name"], rule
        match = re.fullmatch(rule["regex"], name)
        if match is not None:
            labels[rule["target_label"]] = match.expand(rule["replacement"].replace("$", "\\"))
    return labels


def test_workers_of_every_pool_are_scraped_however_many_are_scaled() -> None:
    found = [s for s in prometheus_config()["scrape_configs"] if s["job_name"] == "conveyor-worker"]
    assert len(found) == 1 and "static_configs" not in found[0]
    names = {name for config in found[0]["dns_sd_configs"] for name in config["names"]}
    assert names == {f"worker-{pool}" for pool in POOLS}
    for name in names:
        service = services()[name]
        assert "container_name" not in service and "ports" not in service, (
            f"{name} must scale: no fixed container name or host port"
        )


def test_prometheus_scrapes_every_api_worker_and_beat_on_its_port() -> None:
    ports = metrics_ports()
    targets = scrape_targets()
    assert set(targets) == set(ports), "scrape targets and compose services differ"
    for name, (job, port, labels) in targets.items():
        service = services()[name]
        assert port == ports[name], f"{name} serves metrics on {ports[name]}, not {port}"
        args = parse(command(service))
        assert job == f"conveyor-{args.command}", f"{name} belongs in job conveyor-{args.command}"
        if args.command == "worker":
            assert labels.get("pool") == args.pool, f"{name}: pool label must be {args.pool}"
            assert str(port) in [str(p) for p in service.get("expose", [])], name
        elif args.command == "beat":
            assert str(port) in [str(p) for p in service.get("expose", [])], name


def test_the_expected_metrics_are_exactly_what_the_code_exports() -> None:
    from prometheus_client import Counter as PromCounter
    from prometheus_client import Histogram as PromHistogram
    from prometheus_client.metrics import MetricWrapperBase

    from conveyor.observability import metrics as exported

    found: dict[str, set[str]] = {}
    for value in vars(exported).values():
        if isinstance(value, MetricWrapperBase):
            name = value._name + ("_total" if isinstance(value, PromCounter) else "")
            kind = HISTOGRAMS if isinstance(value, PromHistogram) else COUNTERS_AND_GAUGES
            assert name in kind, f"{name} is exported but not expected"
            found[name] = set(value._labelnames)
    reading = exported.StateReading(
        depths={"high": 0},
        waiting={"high": {"queued": 1}},
        dead={"t": 1},
        oldest_queued={"high": 1.0},
        anomalies=[("t", "run_p95")],
        workflows={"running": 1},
    )
    for family in exported.StateCollector(lambda: reading).collect():
        found[family.name] = {k for s in family.samples for k in s.labels}
    expected = {**COUNTERS_AND_GAUGES, **HISTOGRAMS}
    expected.pop("up")
    assert found == {name: set(labels) for name, labels in expected.items()}

"""The ops kit's metrics files (deploy/ops/prometheus, deploy/ops/grafana): Prometheus's
configuration and alert rules checked and unit-tested by promtool, the Grafana
dashboard's expressions parsed by promtool and held to the worker's metric names."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import ROOT, installed
from .test_deploy import load, run

OPS = ROOT / "deploy" / "ops"
PROMETHEUS = OPS / "prometheus"
GRAFANA = OPS / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "llmworker.json"
KIT_FILES = [
    PROMETHEUS / "prometheus.yml",
    PROMETHEUS / "alerts.yml",
    PROMETHEUS / "alerts.test.yml",
    GRAFANA / "provisioning" / "datasources" / "prometheus.yml",
    GRAFANA / "provisioning" / "dashboards" / "llmworker.yml",
    DASHBOARD,
]

# The names the worker's /metrics exposes (dashboards and alerts rely on them).
COUNTERS = {
    "llmworker_tasks_submitted_total",
    "llmworker_tasks_finished_total",
    "llmworker_tasks_rejected_total",
    "llmworker_provider_requests_total",
    "llmworker_callbacks_total",
    "llmworker_fallbacks_total",
}
GAUGES = {
    "llmworker_queue_waiting",
    "llmworker_queue_oldest_age_seconds",
    "llmworker_tasks_running",
    "llmworker_guard_slots_used",
    "llmworker_guard_slots_limit",
    "llmworker_replicas",
    "llmworker_callbacks_pending",
    "llmworker_model_held_seconds",
    "llmworker_adaptive_cap",
    "llmworker_circuit_open",
}
HISTOGRAMS = {
    "llmworker_task_queue_seconds",
    "llmworker_task_run_seconds",
    "llmworker_provider_ttft_seconds",
    "gen_ai_client_operation_duration_seconds",
    "gen_ai_client_token_usage",
}
METRICS = COUNTERS | GAUGES | HISTOGRAMS | {"up"}
# Series Prometheus makes itself: the firing alerts panel reads ALERTS.
PROMETHEUS_OWN = {"up", "ALERTS"}

PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "inf", "nan"}
# What Grafana puts in place of its variables before it sends a query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": "llmworker-career-worker"}


def promtool() -> str:
    """The promtool binary; CI installs it, so there its absence is a failure, not a skip."""
    return installed("promtool", "prometheus")


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load(PROMETHEUS / "alerts.yml")["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Panels, and the panels inside collapsed rows."""
    found: list[dict[str, Any]] = []
    for panel in panels:
        found.append(panel)
        found.extend(all_panels(panel.get("panels", [])))
    return found


def dashboard_queries() -> dict[str, str]:
    """Every PromQL expression of the dashboard by where it is, variables filled in as
    Grafana does. The template variable's label_values() contributes its selector."""
    data = dashboard()
    queries: dict[str, str] = {}
    for panel in all_panels(data["panels"]):
        for target in panel.get("targets", []):
            queries[f"panel_{panel['id']}:{target['refId']}"] = target["expr"]
    for variable in data["templating"]["list"]:
        found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
        assert found, variable["definition"]
        queries[f"variable_{variable['name']}"] = found.group(1)
    return {name: fill_in(name, expr) for name, expr in queries.items()}


def fill_in(name: str, expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"{name}: a variable Grafana does not fill in: {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers left once strings, label
    matchers, ranges and grouping clauses are gone, other than function names and
    keywords. Enough for the expressions of this kit (promtool has no parser output)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for found in re.finditer(r"(?<![\w:.])[A-Za-z_:][\w:]*", expr):
        name = found.group()
        is_function = expr[found.end() :].lstrip().startswith("(")
        if not is_function and name.lower() not in PROMQL_WORDS:
            names.add(name)
    return names


def documented(name: str) -> str | None:
    """The documented metric a series name belongs to (a histogram's _bucket, _sum and
    _count series belong to the histogram), or None."""
    if name in METRICS or name in PROMETHEUS_OWN:
        return name
    base, _, suffix = name.rpartition("_")
    if suffix in ("bucket", "sum", "count") and base in HISTOGRAMS:
        return base
    return None


def test_metric_names_are_found_in_expressions():
    expr = (
        'histogram_quantile(0.95, sum by (le, model) (rate(llmworker_provider_ttft_seconds_bucket{job=~"a|b"}[5m])))'
        " / on(job) group_left max without(instance) (llmworker_replicas offset 1h) > 1e3"
        ' and absent(up{job="x"} == 1) or ALERTS'
    )
    assert metric_names(expr) == {
        "llmworker_provider_ttft_seconds_bucket",
        "llmworker_replicas",
        "up",
        "ALERTS",
    }
    assert documented("gen_ai_client_token_usage_sum") == "gen_ai_client_token_usage"
    assert documented("llmworker_tasks_running_sum") is None
    assert documented("llmworker_task_id") is None


def test_prometheus_config_passes_promtool_with_its_rule_and_key_files(tmp_path: Path):
    """Laid out as in the container (/etc/prometheus): rule_files and credentials_file
    are relative to the config, so a copy with key files in secrets/ checks in full."""
    binary = promtool()
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(PROMETHEUS / name, tmp_path / name)
    missing = run(binary, "check", "config", tmp_path / "prometheus.yml")
    assert missing.returncode != 0 and "secrets/career-worker.key" in missing.stderr
    for job in load(PROMETHEUS / "prometheus.yml")["scrape_configs"]:
        if "authorization" in job:
            key = tmp_path / job["authorization"]["credentials_file"]
            key.parent.mkdir(exist_ok=True)
            key.write_text("k" * 64 + "\n")
    result = run(binary, "check", "config", tmp_path / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_prometheus_finds_each_tenants_replicas_by_dns_and_sends_a_key_file():
    config = load(PROMETHEUS / "prometheus.yml")
    assert config["global"]["scrape_interval"] == "15s"
    assert config["rule_files"] == ["alerts.yml"]
    jobs = [job for job in config["scrape_configs"] if job["job_name"].startswith("llmworker")]
    assert [job["job_name"] for job in jobs] == ["llmworker-career-worker"]
    for job in jobs:
        tenant = job["job_name"].removeprefix("llmworker-")
        assert job["metrics_path"] == "/metrics"
        assert job["dns_sd_configs"] == [
            {"names": [tenant], "type": "A", "port": 8080, "refresh_interval": "15s"}
        ]
        assert job["authorization"] == {
            "type": "Bearer",
            "credentials_file": f"secrets/{tenant}.key",
        }
    # How to add a second tenant is shown, commented out.
    assert "# - job_name: llmworker-project-b" in (PROMETHEUS / "prometheus.yml").read_text()
    # The key files stay out of the repository.
    assert "deploy/ops/prometheus/secrets/" in (ROOT / ".gitignore").read_text().splitlines()


def test_alert_rules_pass_promtool_check():
    result = run(promtool(), "check", "rules", PROMETHEUS / "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_unit_tests():
    result = run(promtool(), "test", "rules", "alerts.test.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_severity_advice_and_tests_that_fire_and_stay_quiet():
    tests = load(PROMETHEUS / "alerts.test.yml")
    assert tests["rule_files"] == ["alerts.yml"]
    checks = [check for test in tests["tests"] for check in test["alert_rule_test"]]
    rules = alert_rules()
    assert len({rule["alert"] for rule in rules}) == len(rules) >= 5
    for rule in rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 80
        assert any(c["alertname"] == name and c["exp_alerts"] for c in checks), (
            f"{name} never fires"
        )
        assert any(c["alertname"] == name and not c["exp_alerts"] for c in checks), (
            f"{name} is never shown to stay quiet"
        )


def test_alerts_aggregate_counters_by_sum_and_redis_gauges_by_max_without_instance():
    for rule in alert_rules():
        expr = rule["expr"]
        for name in metric_names(expr):
            if name in COUNTERS:
                assert re.search(rf"sum by \([^)]*\) \((rate|increase)\({name}\b", expr), expr
            if name in GAUGES:
                assert f"max without(instance) ({name}" in expr, expr


def test_dashboard_is_valid_json_with_unique_panel_ids_and_a_tenant_variable():
    data = dashboard()
    assert data["uid"] == "llmworker" and data["title"] == "llmworker"
    assert 36 <= data["schemaVersion"] <= 41
    ids = [panel["id"] for panel in all_panels(data["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    (variable,) = data["templating"]["list"]
    assert variable["name"] == "job" and variable["type"] == "query"
    assert variable["definition"].startswith("label_values(up") and variable["definition"].endswith(
        ", job)"
    )
    datasource = load(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    for panel in all_panels(data["panels"]):
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == datasource["uid"], panel["title"]
            if "$job" not in target["expr"]:
                assert target["expr"].startswith("ALERTS"), f"{panel['title']}: not per tenant"


def test_dashboard_expressions_parse(tmp_path: Path):
    """promtool has no parse command here: each expression becomes a recording rule, which
    check rules parses."""
    queries = dashboard_queries()
    rules = [{"record": f"dashboard:{name}", "expr": expr} for name, expr in queries.items()]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool(), "check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_dashboard_and_alerts_use_only_the_documented_metrics_and_all_of_them():
    exprs = {f"dashboard {name}": expr for name, expr in dashboard_queries().items()}
    exprs |= {f"alert {rule['alert']}": rule["expr"] for rule in alert_rules()}
    used: set[str] = set()
    for where, expr in exprs.items():
        for name in metric_names(expr):
            metric = documented(name)
            assert metric is not None, f"{where}: {name} is not a metric the worker exposes"
            used.add(metric)
    assert METRICS - used == set(), "metrics no panel or alert shows"
    panels = " ".join(dashboard_queries().values())
    for histogram in (
        "llmworker_provider_ttft_seconds",
        "gen_ai_client_operation_duration_seconds",
    ):
        for quantile in ("0.5", "0.95"):
            pattern = (
                rf"histogram_quantile\({quantile}, sum by \(le[^)]*\) \(rate\({histogram}_bucket\{{"
            )
            assert re.search(pattern, panels), f"no p{quantile} of {histogram}"


def test_compose_runs_prometheus_and_grafana_behind_caddy_without_host_ports():
    services = load(OPS / "compose.yaml")["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"])
    assert re.fullmatch(r"grafana/grafana(-oss)?:\d+\.\d+\.\d+", grafana["image"])
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert any(flag.startswith("--storage.tsdb.retention.time=") for flag in prometheus["command"])
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "prometheus-data:/prometheus" in prometheus["volumes"]
    for kind in ("datasources", "dashboards"):
        mount = f"./grafana/provisioning/{kind}:/etc/grafana/provisioning/{kind}:ro"
        assert mount in grafana["volumes"]
    provider = load(GRAFANA / "provisioning" / "dashboards" / "llmworker.yml")["providers"][0]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith(
        "${GRAFANA_ADMIN_PASSWORD:?"
    )
    for service in (prometheus, grafana):
        assert "ports" not in service and service["networks"] == ["web"]
    caddyfile = (ROOT / "deploy" / "caddy" / "Caddyfile").read_text()
    assert re.search(r"\n[\w.-]+ \{\n\treverse_proxy grafana:3000\n\}", caddyfile)


@pytest.mark.parametrize("doc", ["deploy.md", "deploy.zh.md"])
def test_deploy_docs_walk_the_metrics_kit(doc: str):
    text = (ROOT / "docs" / doc).read_text()
    for path in KIT_FILES:
        name = str(path.relative_to(OPS))  # as copied to /opt/ops
        assert name in text, f"{doc} does not mention {name}"
    for words in ("max without(instance)", "sum by", "--workers", "GRAFANA_ADMIN_PASSWORD"):
        assert words in text, f"{doc} does not mention {words}"
    for rule in alert_rules():
        assert rule["alert"] in text, f"{doc} does not list {rule['alert']}"

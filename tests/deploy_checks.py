"""Helpers for the deployment tests: the queries the dashboard and the alerting rules use, read
from their files (never copied into a test), and the small tools the tests need to run them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ensemble-serving.json"
KUBERNETES_DIR = DEPLOY / "kubernetes"
COMPOSE_FILE = ROOT / "docker-compose.yml"

def image_limits() -> dict[str, str]:
    """The ENSEMBLE_MAX_* variables the image sets (Dockerfile ENV): its memory limits."""
    env = re.findall(r"(ENSEMBLE_[A-Z_]+)=(\S+?)\s*\\?\n", (ROOT / "Dockerfile").read_text())
    return {name: value for name, value in env if name.startswith("ENSEMBLE_MAX_")}


# What Grafana puts in place of its built-in variables, for running a panel's query by hand.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}


def dashboard_queries(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, rows included, with Grafana's
    variables replaced: built-ins by fixed durations, the dashboard's own by their "All" value."""
    dashboard = json.loads(path.read_text())
    variables = dict(GRAFANA_BUILTINS)
    for var in dashboard.get("templating", {}).get("list", []):
        variables[var["name"]] = var.get("allValue") or ".*"

    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    found = []
    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append((panel["title"], substitute(target["expr"], variables)))
    return found


def dashboard_variable_queries(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(variable name, PromQL) for the dashboard's query variables: `label_values(m, label)` is
    Grafana's, so it becomes the series query `m` (which must exist and carry `label`)."""
    dashboard = json.loads(path.read_text())
    found = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\)\s*", query)
        assert m, f"variable {var['name']}: only label_values(metric, label) is supported, got {query!r}"
        found.append((var["name"], f"count by ({m.group(2)}) ({m.group(1)})"))
    return found


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace Grafana's `$name`, `${name}` and `[[name]]` forms; an unknown variable is an error."""
    def value(m: re.Match) -> str:
        name = next(g for g in m.groups() if g)
        if name not in variables:
            raise KeyError(f"unknown Grafana variable ${name} in {expr!r}")
        return variables[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", value, expr)


def rules(path: Path = PROMETHEUS_DIR / "alerts.yml") -> list[dict]:
    """Every rule (recording and alerting) of a rules file."""
    groups = yaml.safe_load(path.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(?!\s*bool\b)")


def without_filtering(expr: str) -> str:
    """The expression with every comparison made a `bool` comparison, so it returns 0 or 1 for
    each series instead of dropping the series that do not match. An alert's condition is false
    on a healthy service (no result); this form returns a result whenever every metric and label
    it names exists. Label matchers (inside braces) and strings are left alone."""
    out, depth, quote, i = [], 0, None, 0
    while i < len(expr):
        c = expr[i]
        if quote:
            out.append(c)
            if c == "\\":
                out.append(expr[i + 1])
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
            out.append(c)
        elif c == "{":
            depth += 1
            out.append(c)
        elif c == "}":
            depth -= 1
            out.append(c)
        elif depth == 0 and (m := _COMPARISON.match(expr, i)):
            out.append(m.group(1) + " bool")
            i += len(m.group(1))
            continue
        else:
            out.append(c)
        i += 1
    return "".join(out)


def yaml_documents(path: Path) -> list[dict]:
    """Every non-empty YAML document of a file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def ensure_debian_packages(commands: dict[str, str]) -> str | None:
    """Install the Debian package of each missing command ({command: package}); None when all
    are there afterwards, else why not (for pytest.skip)."""
    missing = sorted({pkg for cmd, pkg in commands.items() if shutil.which(cmd) is None})
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"{', '.join(missing)} not installed, and installing needs root (apt-get install {' '.join(missing)})"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, capture_output=True,
                   timeout=1200)
    still = [cmd for cmd in commands if shutil.which(cmd) is None]
    return f"apt-get installed {missing} but {still} are still missing" if still else None

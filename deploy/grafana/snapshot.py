"""A PNG picture of the dashboard drawn from a real Prometheus: every panel's queries over a time range,
one small plot per panel, laid out by the dashboard's rows (matplotlib, no Grafana needed).

tests/test_prometheus.py calls ``draw`` when ``DISPATCHER_DASHBOARD_PNG`` names a file: that is how
docs/dashboard.png was made, from the test's 30 s load.
"""

from __future__ import annotations

import json
import math
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
    url = prometheus + "/api/v1/query_range?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())["data"]["result"]


def legend(template: str, labels: dict[str, str]) -> str:
    for key, value in labels.items():
        template = template.replace("{{" + key + "}}", value)
    return template


def draw(
    prometheus: str, dashboard: dict[str, Any], substitutions: dict[str, str], start: float, end: float, out: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[tuple[str, list[dict[str, Any]]]] = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            rows.append((panel["title"], []))
        elif rows:
            rows[-1][1].append(panel)
    columns = max(len(panels) for _, panels in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(3.2 * columns, 2.4 * len(rows)), dpi=90, squeeze=False)
    step = max(1.0, (end - start) / 120)
    for r, (title, panels) in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            if c >= len(panels):
                ax.axis("off")
                continue
            panel = panels[c]
            for target in panel["targets"]:
                expr = target["expr"]
                for variable, value in substitutions.items():
                    expr = expr.replace(variable, value)
                for series in query_range(prometheus, expr, start, end, step):
                    points = [(float(t) - start, float(v)) for t, v in series["values"] if not math.isnan(float(v))]
                    if points:
                        xs, ys = zip(*points, strict=True)
                        ax.plot(xs, ys, linewidth=1, label=legend(target["legendFormat"], series["metric"])[:28])
            ax.set_title(panel["title"][:40], fontsize=7)
            ax.tick_params(labelsize=6)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=5, loc="upper left")
            if c == 0:
                ax.set_ylabel(title, fontsize=7, fontweight="bold")
    fig.suptitle("dispatcher dashboard, from a real Prometheus scraping a 30 s test load (x: seconds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)

"""Render flwr-guard's Grafana dashboards from a real Prometheus after a short run.

There is no Grafana here, so this script does what Grafana would: it runs a protected
training (Flower simulation of an app whose ServerApp uses
``flwr_guard.telemetry.TelemetryStrategy``; by default tests/fixtures/telemetry_app),
scrapes its exporter with a real Prometheus (Debian's ``prometheus`` package), sends
every panel's PromQL of deploy/grafana/dashboards/*.json to Prometheus' HTTP API, and
draws the answers with matplotlib at the panels' grid positions:

- ``timeseries`` panels: ``/api/v1/query_range`` over the run, one line per series;
- ``stat`` panels: ``/api/v1/query`` at the last scrape of the run, the values as text;
- ``bargauge`` panels: the same instant query as bars (``format: heatmap`` targets are
  cumulative histogram buckets, drawn per bucket as Grafana does).

Writes docs/img/metrics_<dashboard>.png and benchmarks/results/render_dashboards.json
(every query with its answer). Usage::

    PATH=.venv/bin:$PATH .venv/bin/python benchmarks/render_dashboards.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from flwr_guard.demo import DemoOptions, run_demo
from flwr_guard.deployment import free_port
from flwr_guard.telemetry.prometheus_server import LocalPrometheus

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"
UNIT_SCALE = {"percentunit": 100.0}
UNIT_SUFFIX = {"percentunit": " %", "s": " s", "dB": " dB", "decbytes": " B"}


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or "value"


def short_run(run: str) -> dict[str, str]:
    return {"run": run[-6:]}


def last_scrape(prom: LocalPrometheus, start: float, end: float) -> float:
    series = prom.query_range('max(flwr_guard_round{job="flwr-guard", instance!=""})', start, end, 0.5)
    if not series:
        raise SystemExit("the exporter was never scraped: nothing to render")
    return float(series[0]["values"][-1][0])


def panel_data(prom: LocalPrometheus, panel: dict, start: float, end: float, at: float) -> list[dict]:
    out = []
    for target in panel["targets"]:
        expr = target["expr"].replace("$run", ".*")
        if panel["type"] == "timeseries":
            result = prom.query_range(expr, start, end, max(1.0, (end - start) / 300))
            series = [{"labels": r["metric"],
                       "points": [(float(t) - start, float(v)) for t, v in r["values"]]}
                      for r in result]
        else:
            series = [{"labels": r["metric"], "value": float(r["value"][1])}
                      for r in prom.query(expr, at=at)]
        out.append({"expr": expr, "legendFormat": target.get("legendFormat", ""),
                    "format": target.get("format", "time_series"), "series": series})
    return out


def _label_text(target: dict, series: dict) -> str:
    labels = {**series["labels"], **short_run(series["labels"].get("run", ""))}
    return legend(target["legendFormat"], labels)


def draw_panel(ax: Any, panel: dict, data: list[dict]) -> None:
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
    scale, suffix = UNIT_SCALE.get(unit, 1.0), UNIT_SUFFIX.get(unit, "")
    ax.set_title(panel["title"], fontsize=9, loc="left")
    ax.tick_params(labelsize=7)
    if not any(t["series"] for t in data):
        ax.text(0.5, 0.5, "no data", ha="center", va="center", color="grey", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    if panel["type"] == "timeseries":
        for target in data:
            for s in target["series"]:
                xs, ys = zip(*s["points"]) if s["points"] else ((), ())
                ax.plot(xs, [y * scale for y in ys], marker="o", markersize=2, linewidth=1.5,
                        label=_label_text(target, s))
        ax.set_xlabel("seconds since the run started", fontsize=7)
        if suffix:
            ax.set_ylabel(suffix.strip(), fontsize=7)
        ax.legend(fontsize=6, loc="best")
        ax.grid(alpha=0.3)
    elif panel["type"] == "stat":
        lines = [f"{_label_text(t, s)}: {_fmt(s['value'] * scale)}{suffix}"
                 for t in data for s in t["series"]]
        ax.text(0.5, 0.5, "\n".join(lines), ha="center", va="center", fontsize=11,
                fontweight="bold", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    else:  # bargauge
        names, values = [], []
        for target in data:
            series = target["series"]
            if target["format"] == "heatmap":  # cumulative buckets -> per bucket
                series = sorted(series, key=lambda s: float(s["labels"]["le"]))
                previous = 0.0
                for s in series:
                    names.append(f"≤ {s['labels']['le']}")
                    values.append(s["value"] - previous)
                    previous = s["value"]
            else:
                for s in series:
                    names.append(_label_text(target, s))
                    values.append(s["value"] * scale)
        ax.barh(range(len(values)), values, color="tab:blue")
        ax.set_yticks(range(len(values)), names, fontsize=6)
        ax.invert_yaxis()
        for i, value in enumerate(values):
            ax.text(value, i, f" {_fmt(value)}{suffix}", va="center", fontsize=6)
        ax.grid(axis="x", alpha=0.3)


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "∞"
    if value == int(value) and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.4g}"


def collect(prom: LocalPrometheus, start: float, end: float) -> dict[str, Any]:
    """Every panel's query results, by dashboard file name."""
    at = last_scrape(prom, start, end)
    summary: dict[str, Any] = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        summary[path.name] = [
            {"title": p["title"], "type": p["type"], "targets": panel_data(prom, p, start, end, at)}
            for p in dashboard["panels"]
        ]
    return summary


def draw(summary: dict[str, Any], out_dir: Path) -> None:
    """One PNG per dashboard, panels at their grid positions."""
    for name, answers in summary.items():
        dashboard = json.loads((DASHBOARDS / name).read_text())
        panels = dashboard["panels"]
        rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
        fig = plt.figure(figsize=(16, rows * 0.6 + 1.0))
        grid = fig.add_gridspec(rows, 24, hspace=3.5, wspace=2.0, top=1 - 0.6 / (rows * 0.6 + 1.0))
        fig.suptitle(f"{dashboard['title']} — panels rendered from a real Prometheus",
                     fontsize=13, x=0.01, ha="left", y=0.995)
        for panel, answer in zip(panels, answers, strict=True):
            g = panel["gridPos"]
            ax = fig.add_subplot(grid[g["y"]:g["y"] + g["h"], g["x"]:g["x"] + g["w"]])
            draw_panel(ax, panel, answer["targets"])
        target = out_dir / f"metrics_{Path(name).stem.replace('-', '_')}.png"
        fig.savefig(target, dpi=80, bbox_inches="tight")
        plt.close(fig)
        print(f"wrote {target.relative_to(REPO)} ({len(panels)} panels)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app-dir", type=Path, default=REPO / "tests/fixtures/telemetry_app")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks/results/render_dashboards.json")
    parser.add_argument("--run-config", action="append", default=[],
                        help="extra run config KEY=JSON_VALUE (repeatable)")
    parser.add_argument("--redraw", action="store_true",
                        help="only redraw the PNGs from --results (no run)")
    args = parser.parse_args(argv)
    if args.redraw:
        draw(json.loads(args.results.read_text())["dashboards"], args.out)
        return 0
    # The fixture's defaults, with less noise so that the model learns in 5 rounds, a
    # client failing at SecAgg+'s masked-input stage in round 3, and a record-level budget
    # the DP-SGD clients exceed (the dashboards then show a budget overrun).
    run_config: dict[str, Any] = {
        "drop-partition": 1, "drop-round": 3, "dp-noise-multiplier": 0.3,
        "dp-sgd-noise-multiplier": 0.7, "learning-rate": 0.5, "dp-sgd-max-epsilon": 4.0,
        "metrics-linger": 3.0,
    }
    for item in args.run_config:
        key, _, value = item.partition("=")
        run_config[key] = json.loads(value)
    port = free_port()
    run_config["metrics-port"] = port
    args.out.mkdir(parents=True, exist_ok=True)
    with LocalPrometheus({"flwr-guard": [f"127.0.0.1:{port}"]}) as prom:
        start = time.time()
        result = run_demo(DemoOptions(nodes=args.nodes, rounds=args.rounds, simulation=True,
                                      app_dir=args.app_dir, run_config=run_config))
        end = time.time()
        print(f"run {result.run_id}: {result.status} in {result.elapsed_s:.0f} s")
        if not result.success:
            print(result.error, file=sys.stderr)
            return 1
        summary = collect(prom, start, end)
    draw(summary, args.out)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({
        "run": result.run_id, "nodes": args.nodes, "rounds": args.rounds,
        "run-config": run_config, "elapsed-s": result.elapsed_s, "dashboards": summary,
    }, indent=1) + "\n")
    print(f"wrote {args.results.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

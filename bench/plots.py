"""Turn `bench/results/*.json` into the PNG plots and markdown tables of docs/BENCHMARKS.md.

Usage: ``python -m bench.plots`` (plots into docs/, tables into the `<!-- begin:NAME -->` / `<!-- end:NAME -->`
markers of docs/BENCHMARKS.md and to stdout; results that do not exist yet are skipped).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DOCS = REPO / "docs"
STATUS_COLOURS = {200: "tab:green", 429: "tab:orange", 503: "tab:red", 504: "tab:purple", 0: "black"}


def load_result(name: str) -> dict[str, Any] | None:
    """bench/results/NAME parsed, or None when that benchmark has not been run."""
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: floats to `digits` places, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


# --------------------------------------------------------------------------------------------- model speed


def model_speed_plots(data: dict[str, Any], out: Path) -> None:
    rows = data["rows"]
    models = sorted({row["model"] for row in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        series: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            if row["model"] != model:
                continue
            if row["method"] in ("none", "nuwa", "random", "fastv", "visionzip"):
                key = "none (unpruned)" if row["method"] == "none" else f"{row['method']} {row['budget']:g}"
                if row["method"] in ("random", "fastv", "visionzip") and row["budget"] != 0.25:
                    continue
                series.setdefault(key, []).append(row)
        for key, points in sorted(series.items()):
            points.sort(key=lambda r: r["batch_size"])
            ax.plot(
                [p["total_ms"] for p in points],
                [p["requests_per_s"] for p in points],
                marker="o",
                linestyle="--" if "none" in key else "-",
                label=key,
            )
            for p in points:
                ax.annotate(f"b{p['batch_size']}", (p["total_ms"], p["requests_per_s"]), fontsize=7)
        ax.set_xlabel("batch latency: preprocess + vision + prune + prefill + decode (ms)")
        ax.set_ylabel("throughput (requests/s)")
        ax.set_title(f"{model}: throughput vs latency, batch 1/4/16")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench_model_throughput_latency.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5), squeeze=False)
    stages = ("vision_ms", "prune_ms", "prefill_ms", "decode_ms")
    for ax, model in zip(axes[0], models, strict=True):
        chosen = [
            r
            for r in rows
            if r["model"] == model
            and r["batch_size"] == 16
            and (r["method"] == "none" or r["budget"] == 0.25)
        ]
        labels = [("none" if r["method"] == "none" else f"{r['method']}\n25%") for r in chosen]
        bottom = [0.0] * len(chosen)
        for stage in stages:
            values = [r[stage] for r in chosen]
            ax.bar(labels, values, bottom=bottom, label=stage.replace("_ms", ""))
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.plot(
            labels, [r["flops_floor_ms"] for r in chosen], "k_", markersize=20, label="prefill FLOPs floor"
        )
        ax.set_ylabel("ms per batch of 16")
        ax.set_title(f"{model}: stage times, batch 16, 25% budget")
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench_model_stages.png", dpi=110)
    plt.close(fig)


def model_speed_tables(data: dict[str, Any]) -> str:
    peak = data["peak_matmul"]
    lines = [
        f"Peak {peak['dtype']} GEMM measured in this run: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s "
        f"({peak['size']}^3, best of {peak['runs']}); decode = {data['new_tokens']} tokens per sample, "
        f"median of {data['repeats']} runs after a warm-up.",
        "",
    ]
    check = data.get("paper_flops_check")
    if check:
        plan = check["plan_64"]
        lines += [
            f"Paper FLOPs check ({check['shape']}): unpruned {check['tflops_unpruned']:.4f} TFLOPs, 64-token Nüwa "
            f"plan (K1 {plan['stage1']}, K2 {plan['stage2']} from layer {plan['layer']}) {check['tflops_64']:.4f} "
            f"TFLOPs; paper: {data['paper']['tflops_unpruned']} / {data['paper']['tflops_pruned']}.",
            "",
        ]
    for model in sorted({row["model"] for row in data["rows"]}):
        lines += [
            f"**{model}**",
            "",
            "| method | budget | batch | stage-1 tok | avg tok | vision ms | prune ms | prefill ms | decode ms "
            "| TTFT ms | tok/s (decode) | req/s | prefill GFLOPs/sample | FLOPs floor ms | prefill / floor |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in data["rows"]:
            if r["model"] != model:
                continue
            budget = "all" if r["budget"] is None else f"{r['budget']:g}"
            ratio = r["prefill_ms"] / r["flops_floor_ms"] if r["flops_floor_ms"] else None
            lines.append(
                f"| {r['method']} | {budget} | {r['batch_size']} | {r['stage1_tokens']:.0f} | "
                f"{r['average_tokens']:.1f} | {r['vision_ms']:.1f} | {r['prune_ms']:.1f} | {r['prefill_ms']:.1f} | "
                f"{r['decode_ms']:.1f} | {r['ttft_ms']:.1f} | {r['decode_tokens_per_s']:.0f} | "
                f"{r['requests_per_s']:.1f} | {r['prefill_tflops'] * 1e3:.3f} | {r['flops_floor_ms']:.1f} | "
                f"{fmt(ratio)}x |"
            )
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- service


def service_plots(data: dict[str, Any], out: Path) -> None:
    runs = [s for s in data["overload"] if s["factor"] == 2.0] + [
        s for s in data["degradation"] if s["factor"] == 2.0
    ]
    fig, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs), 4.5), squeeze=False, sharey=True)
    for ax, run in zip(axes[0], runs, strict=True):
        for status, colour in STATUS_COLOURS.items():
            points = [p for p in run["latency_trace"] if p[2] == status]
            if points:
                ax.scatter(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    s=8,
                    c=colour,
                    label=f"{status} ({len(points)})",
                )
        ax.axhline(run["deadline_s"] * 1000, color="k", linestyle=":", label="deadline")
        if run["p99_ms"] is not None:
            ax.axhline(
                run["p99_ms"], color="tab:green", linestyle="--", label=f"p99 of 200s {run['p99_ms']:.0f} ms"
            )
        ax.set_title(
            f"{run['label']}: offered {run['offered_rps']:.1f} req/s, answered {run['throughput_rps']:.1f}"
        )
        ax.set_xlabel("send time (s)")
        ax.set_ylabel("latency (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "bench_service_overload.png", dpi=110)
    plt.close(fig)

    if data.get("batching"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for entry in data["batching"]:
            points = entry["points"]
            ax.plot(
                [p["p99_ms"] for p in points],
                [p["throughput_rps"] for p in points],
                marker="o",
                label=f"max_batch_size {entry['max_batch_size']}",
            )
            for p in points:
                ax.annotate(f"c{p['concurrency']}", (p["p99_ms"], p["throughput_rps"]), fontsize=7)
        ax.axvline(data["p99_budget_ms"], color="k", linestyle=":", label="p99 budget")
        ax.set_xlabel("p99 latency (ms)")
        ax.set_ylabel("throughput (requests/s)")
        ax.set_title("Batching gain: closed loop at concurrency c")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "bench_service_batching.png", dpi=110)
        plt.close(fig)


def service_tables(data: dict[str, Any]) -> str:
    cap = data["capacity"]
    lines = [
        f"Capacity (closed loop, {cap['target']:.0f} in flight, {cap['requests']} requests): "
        f"**{cap['throughput_rps']:.2f} requests/s**, p50 {cap['p50_ms']} ms, p99 {cap['p99_ms']} ms.",
        "",
        f"Overload server: `max_batch_size` {data['plain_settings']['max_batch_size']}, deadline "
        f"{data['deadline_s']:g} s, queue bound {data['plain_settings']['max_queue_requests']} requests "
        f"(= deadline x capacity). Degradation server: the same plus `NUWA_DEGRADE_QUEUE_START` "
        f"{data['degrade_settings'].get('degrade_queue_start')}, `NUWA_DEGRADE_QUEUE_FULL` "
        f"{data['degrade_settings'].get('degrade_queue_full')}, floor 0.25.",
        "",
        "| run | offered req/s | answered 200/s | p50 ms | p95 ms | p99 ms | max ms (any answer) | statuses "
        "| past deadline + 0.5 s | no answer | 429s all with Retry-After | degraded | mean stage-1 tokens |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in data["overload"] + data["degradation"]:
        statuses = ", ".join(f"{k}: {v}" for k, v in s["statuses"].items())
        lines.append(
            f"| {s['label']} | {fmt(s['offered_rps'])} | {fmt(s['throughput_rps'])} | {fmt(s['p50_ms'], 0)} | "
            f"{fmt(s['p95_ms'], 0)} | {fmt(s['p99_ms'], 0)} | {fmt(s['answered_max_ms'], 0)} | {statuses} | "
            f"{s['answers_past_deadline']} | {s['no_response']} | "
            f"{'yes' if s['rejections_all_429_with_retry_after'] else 'NO'} | {s['degraded']} | "
            f"{fmt(s['mean_stage1_tokens'])} |"
        )
    return "\n".join(lines)


def batching_tables(data: dict[str, Any]) -> str:
    lines: list[str] = []
    if data.get("batching"):
        lines += [
            f"Closed loop, best throughput with p99 <= {data['p99_budget_ms']:.0f} ms:",
            "",
            "| max_batch_size | best req/s within budget | at concurrency | its p99 ms | mean batch | all points "
            "(c: req/s @ p99 ms) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for entry in data["batching"]:
            best = entry["best_within_budget"] or {}
            points = "; ".join(
                f"c{p['concurrency']}: {p['throughput_rps']:.1f} @ {fmt(p['p99_ms'], 0)}"
                for p in entry["points"]
            )
            lines.append(
                f"| {entry['max_batch_size']} | {fmt(best.get('throughput_rps'))} | {fmt(best.get('concurrency'))} "
                f"| {fmt(best.get('p99_ms'), 0)} | {fmt(best.get('mean_batch_size'))} | {points} |"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- faults


def fault_plots(data: dict[str, Any], out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    kills, term = data["worker_kills"], data["sigterm"]
    for ax, run, title in ((axes[0], kills, "worker SIGKILLed twice"), (axes[1], term, "server SIGTERM")):
        for status, colour in STATUS_COLOURS.items():
            points = [p for p in run["trace"] if p[2] == status]
            if points:
                label = "no answer (refused connection)" if status == 0 else str(status)
                ax.scatter(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    s=8,
                    c=colour,
                    label=f"{label} ({len(points)})",
                )
        ax.set_xlabel("send time (s)")
        ax.set_ylabel("latency (ms)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for kill in kills["kills"]:
        axes[0].axvline(kill["at_s"], color="tab:red", linestyle=":")
        if kill["ready_again_after_s"] is not None:
            axes[0].axvspan(
                kill["at_s"], kill["at_s"] + kill["ready_again_after_s"], color="tab:red", alpha=0.1
            )
    axes[1].axvline(term["signal_at_s"], color="tab:red", linestyle=":", label="SIGTERM")
    axes[1].axvline(term["signal_at_s"] + term["drain_s"], color="k", linestyle=":", label="process exit")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench_faults.png", dpi=110)
    plt.close(fig)


def fault_tables(data: dict[str, Any]) -> str:
    kills, term = data["worker_kills"], data["sigterm"]
    late = [term["signal_at_s"] - p[0] for p in term["trace"] if p[0] < term["signal_at_s"] and p[2] == 503]
    lines = [
        f"Worker kills: open loop at {kills['rate_rps']:.1f} req/s (0.7 x {kills['capacity_rps']:.1f}) for "
        f"{kills['duration_s']:g} s.",
        "",
        "| kill | at s | /readyz 503 after s | /readyz 200 again after s |",
        "| --- | --- | --- | --- |",
    ]
    for index, kill in enumerate(kills["kills"], 1):
        lines.append(
            f"| {index} | {kill['at_s']:.2f} | {fmt(kill.get('unready_after_s'), 3)} | "
            f"{fmt(kill['ready_again_after_s'], 2)} |"
        )
    lines += [
        "",
        f"Answers: {kills['answers']['statuses']}, codes {kills['answers']['error_codes']}; requests with no "
        f"answer: {kills['no_response']}; Retry-After on every 503: {kills['retry_after_on_every_503']}; "
        f"restarts reported by /healthz: {kills['restarts_reported']}; exit code {kills['exit_code']}.",
        "",
        f"SIGTERM: open loop at {term['rate_rps']:.1f} req/s (1.5 x {term['capacity_rps']:.1f}); signal at "
        f"{term['signal_at_s']:.2f} s; drained and exited {term['drain_s']:.2f} s later with exit code "
        f"**{term['exit_code']}**.",
        "",
        f"Requests sent before the signal that got 503: {len(late)}"
        + (
            f", sent {min(late) * 1000:.0f}-{max(late) * 1000:.0f} ms before it (still in flight to the server "
            "when it started draining, so never admitted)."
            if late
            else "."
        ),
        "",
        "| requests | statuses | error codes | client-side failures |",
        "| --- | --- | --- | --- |",
        f"| sent before the signal ({term['sent_before_signal']['requests']}) | "
        f"{term['sent_before_signal']['statuses']} | {term['sent_before_signal']['error_codes']} | "
        f"{term['sent_before_signal']['failures']} |",
        f"| sent after the signal ({term['sent_after_signal']['requests']}) | "
        f"{term['sent_after_signal']['statuses']} | {term['sent_after_signal']['error_codes']} | "
        f"{term['sent_after_signal']['failures']} |",
    ]
    return "\n".join(lines)


def fill_doc(doc: Path, tables: dict[str, str]) -> None:
    """Replace the text between `<!-- begin:NAME -->` and `<!-- end:NAME -->` in `doc` with the NAME table."""
    text = doc.read_text()
    for name, table in tables.items():
        begin, end = f"<!-- begin:{name} -->", f"<!-- end:{name} -->"
        if begin not in text or end not in text:
            continue
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{begin}\n{table}\n{end}{tail}"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Plots (docs/*.png) and markdown tables from bench/results.")
    parser.add_argument("--out", type=Path, default=DOCS)
    parser.add_argument("--doc", type=Path, default=DOCS / "BENCHMARKS.md", help="fill its table markers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sections = []
    tables_by_name: dict[str, str] = {}
    for marker, name, plots, tables in (
        ("model_speed_cpu", "model_speed_cpu.json", model_speed_plots, model_speed_tables),
        ("model_speed_cuda", "model_speed_cuda.json", None, model_speed_tables),
        ("service_load", "service_load.json", service_plots, service_tables),
        ("batching", "service_load.json", None, batching_tables),
        ("fault_run", "fault_run.json", fault_plots, fault_tables),
    ):
        data = load_result(name)
        if data is None:
            logger.info("no %s yet; skipped", name)
            continue
        if plots is not None:
            plots(data, args.out)
        tables_by_name[marker] = tables(data)
        sections.append(f"<!-- {marker} -->\n{tables_by_name[marker]}")
    from bench.serving_plots import serving_tables  # the serving-core results (their own module)

    for marker, table in serving_tables(args.out).items():
        tables_by_name[marker] = table
        sections.append(f"<!-- {marker} -->\n{table}")
    if args.doc.is_file():
        fill_doc(args.doc, tables_by_name)
    print("\n\n".join(sections))


if __name__ == "__main__":
    main()

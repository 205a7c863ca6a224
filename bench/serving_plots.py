"""Tables and plots of the serving-core benchmarks (request overhead, side by side, cache, batching, pipelining).

Reads `bench/results/{request_overhead,request_spans,http_floor,side_by_side,cache_gain,batching_gain,pipeline_gain,follow_ups}.json`, writes PNGs
into docs/ and fills the `<!-- begin:NAME -->` / `<!-- end:NAME -->` markers of docs/BENCHMARKS.md. Called by
`python -m bench.plots` (which fills every table) or alone: ``python -m bench.serving_plots``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from bench.plots import DOCS, fill_doc, fmt, load_result  # noqa: E402

logger = logging.getLogger(__name__)

PARTS = ("queue", "ipc", "image_decode", "server_rest", "client_rest")


def _loads_line(data: dict[str, Any]) -> str:
    """One sentence on the load averages recorded around the run's points."""
    runs = data.get("load_average", {}).get("runs", {}) or {}
    if "load_before" in data.get("load_average", {}):  # bench.quiet_run's flat record
        runs = {"run": data["load_average"]}
    if not runs:
        return "Load averages: not recorded."
    first = next(iter(runs.values()))
    befores = [r["load_before"] for r in runs.values() if "load_before" in r]
    afters = [r["load_after"] for r in runs.values() if "load_after" in r]
    waited = first.get("waited_s", 0)
    quiet = first.get("quiet")
    gate = (
        f"waited {waited} s for the 1-min load average to fall below 1.0 before the first point"
        if quiet
        else (
            f"the 1-min load average did NOT fall below 1.0 within {waited} s; ran anyway"
            if quiet is False
            else "no wait (smoke)"
        )
    )
    return (
        f"Load averages (1 min): {gate}; at the start of the points {min(befores):.2f}-{max(befores):.2f}, "
        f"after them {min(afters):.2f}-{max(afters):.2f}."
    )


# --------------------------------------------------------------------------------------------- overhead


def overhead_tables(data: dict[str, Any]) -> str:
    names = {"png_336": "336 px PNG", "jpeg_12mp": "12 MP JPEG (4000x3000, q=90)"}
    lines = [
        f"{data['results'][next(iter(data['results']))]['requests']} sequential requests per image, idle server, "
        f"each its own image bytes (cache hits: "
        + ", ".join(f"{names[k]} {v['cache_hits']}" for k, v in data["results"].items())
        + "). All in ms.",
        "",
        "| image | bytes | client p50 / p99 | model stages p50 | **overhead p50 / p99** | queue | ipc | "
        "image_decode | server rest | client rest | HTTP floor (GET /readyz) p50 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, result in data["results"].items():
        ms = result["ms"]
        lines.append(
            f"| {names.get(key, key)} | {result['image_bytes']:,} | {fmt(ms['client']['p50'])} / "
            f"{fmt(ms['client']['p99'])} | {fmt(ms['model']['p50'])} | **{fmt(ms['overhead']['p50'], 2)} / "
            f"{fmt(ms['overhead']['p99'], 2)}** | "
            + " | ".join(f"{fmt(ms[part]['p50'], 2)}" for part in PARTS)
            + f" | {fmt(result['http_floor_get_readyz_ms']['p50'], 2)} |"
        )
    lines += [
        "",
        "Parts are medians of each column (they need not add up to the median overhead exactly); means: "
        + "; ".join(
            f"{names.get(key, key)}: overhead {fmt(r['ms']['overhead']['mean'], 2)} = "
            + " + ".join(f"{part} {fmt(r['ms'][part]['mean'], 2)}" for part in PARTS)
            for key, r in data["results"].items()
        )
        + ".",
        "",
        _loads_line(data),
    ]
    return "\n".join(lines)


def spans_tables(data: dict[str, Any]) -> str:
    ms = data["ms"]
    hops = [hop["name"] for hop in data["hops"]]
    lines = [
        f"{data['requests']} sequential requests, idle server, each its own 336 px PNG; every hop is the difference "
        "of two CLOCK_MONOTONIC readings (client, API process, worker). All in ms.",
        "",
        "| hop | from -> to | p50 | p99 | mean |",
        "| --- | --- | --- | --- | --- |",
    ]
    for hop in data["hops"]:
        values = ms[hop["name"]]
        lines.append(
            f"| {hop['name']} | {hop['from']} -> {hop['to']} | {fmt(values['p50'], 2)} | {fmt(values['p99'], 2)} | "
            f"{fmt(values['mean'], 2)} |"
        )
    hop_sum = sum(ms[name]["p50"] for name in hops)
    lines += [
        f"| **client latency** | sent -> answered | **{fmt(ms['client']['p50'], 2)}** | {fmt(ms['client']['p99'], 2)} | "
        f"{fmt(ms['client']['mean'], 2)} |",
        f'| model stages (`timing_ms`, inside "prepare" and "model") | | {fmt(ms["model stages"]["p50"], 2)} | '
        f"{fmt(ms['model stages']['p99'], 2)} | {fmt(ms['model stages']['mean'], 2)} |",
        f"| **overhead** (client - model stages) | | **{fmt(ms['overhead']['p50'], 2)}** | "
        f"{fmt(ms['overhead']['p99'], 2)} | {fmt(ms['overhead']['mean'], 2)} |",
        "",
        f"The hops' p50s add up to {fmt(hop_sum, 2)} ms (medians need not add up exactly). "
        + _loads_line(data),
    ]
    return "\n".join(lines)


def http_floor_tables(data: dict[str, Any]) -> str:
    names = {"png_form": "336 px PNG form", "3mb_form": "3 MB file part"}
    servers = [name for name in next(iter(data["results"].values())) if name != "bytes"]
    lines = [
        "Client latency (ms, p50 / p99) of sequential POSTs to a route that reads the body and answers 8 bytes; "
        f"{data['client']}; {data['server']}.",
        "",
        "| body | bytes | " + " | ".join(servers) + " |",
        "| --- | --- | " + " | ".join("---" for _ in servers) + " |",
    ]
    for key, result in data["results"].items():
        cells = [f"{fmt(result[name]['p50'], 2)} / {fmt(result[name]['p99'], 2)}" for name in servers]
        lines.append(f"| {names.get(key, key)} | {result['bytes']:,} | " + " | ".join(cells) + " |")
    decode = data.get("decode_png_ms")
    if decode:
        lines += [
            "",
            f"Decode floor: `decode_for_model` of the same PNG at 336 px, in process, warm: {fmt(decode['p50'], 2)} ms "
            f"p50 ({fmt(decode['p99'], 2)} p99, {decode['count']} calls).",
        ]
    lines += ["", _loads_line(data)]
    return "\n".join(lines)


def overhead_plot(data: dict[str, Any], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 3.6))
    names = list(data["results"])
    left = [0.0] * len(names)
    for part in PARTS:
        widths = [data["results"][n]["ms"][part]["mean"] for n in names]
        ax.barh(names, widths, left=left, label=part)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.axvline(3.0, color="black", linestyle="--", linewidth=1, label="target 3 ms (p50)")
    ax.set_xlabel("mean request-path overhead per request (ms): client latency - model stages")
    ax.set_title("Where the request path spends its time (idle server, sequential)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(out / "bench_request_overhead.png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- side by side


def side_by_side_tables(data: dict[str, Any]) -> str:
    points = data["points"]
    servers = list(dict.fromkeys(p["server"] for p in points))
    peer = next(s for s in servers if s.startswith("LitServe"))
    rounds = sorted({p["round"] for p in points})
    ratios = {row["concurrency"]: row for row in data.get("ratios", [])}
    lines = [
        f"Closed loop, every request its own image; `max_new_tokens` {data['max_new_tokens']}, "
        f"{data['threads']} torch thread per model process; {len(rounds)} round(s) per concurrency, back to back "
        "(rounds 2, 4, ... in the reverse order), the peer frozen outside its points; throughput = answered "
        "requests / wall time of the point; **x peer** = median over the rounds of the round's ratio (the kind's "
        "req/s over the peer's in the same round; per round in brackets); of means = mean req/s over the peer's.",
        "",
        "| concurrency | server | req/s (per round) | **x peer** (per round) | of means | p50 ms | p99 ms "
        "| mean batch | stage-1 tokens |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for concurrency in sorted({p["concurrency"] for p in points}):
        for server in servers:
            mine = [p for p in points if p["server"] == server and p["concurrency"] == concurrency]
            mean = statistics.fmean(p["throughput_rps"] for p in mine)
            if server == peer:
                ratio, of_means = "1.00", "1.00"
            else:
                row = ratios[concurrency][server]
                per_round = ", ".join(f"{r:.2f}" for r in row.get("x_peer_per_round", []))
                ratio = f"**{row['x_peer']:.2f}** ({per_round})"
                of_means = f"{row.get('x_peer_of_means', row['x_peer']):.2f}"
            lines.append(
                f"| {concurrency} | {server} | {mean:.2f} ("
                + ", ".join(f"{p['throughput_rps']:.2f}" for p in mine)
                + f") | {ratio} | {of_means} | "
                + " / ".join(fmt(p["p50_ms"], 0) for p in mine)
                + " | "
                + " / ".join(fmt(p["p99_ms"], 0) for p in mine)
                + f" | {fmt(mine[0]['mean_batch_size'])} | {fmt(mine[0]['mean_stage1_tokens'], 0)} |"
            )
    hits = sum(p["cache_hits"] for p in points)
    statuses: dict[str, int] = {}
    for p in points:
        for code, count in p["statuses"].items():
            statuses[code] = statuses.get(code, 0) + count
    same = data.get("same_answers", [])
    lines += [
        "",
        f"Statuses over all points: {statuses}; embedding-cache hits: {hits}. Same answer from both servers "
        f"(raw model output, unpruned) on {sum(c['same'] for c in same)} of {len(same)} check images.",
        "",
        _loads_line(data),
    ]
    return "\n".join(lines)


def side_by_side_plot(data: dict[str, Any], out: Path) -> None:
    points = data["points"]
    servers = list(dict.fromkeys(p["server"] for p in points))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for server in servers:
        concurrencies = sorted({p["concurrency"] for p in points if p["server"] == server})
        rps = [
            statistics.fmean(
                p["throughput_rps"] for p in points if p["server"] == server and p["concurrency"] == c
            )
            for c in concurrencies
        ]
        p99 = [
            statistics.fmean(p["p99_ms"] for p in points if p["server"] == server and p["concurrency"] == c)
            for c in concurrencies
        ]
        style = "--" if server.startswith("LitServe") else "-"
        left.plot(concurrencies, rps, style, marker="o", label=server)
        right.plot(concurrencies, p99, style, marker="o", label=server)
    for ax, label in ((left, "throughput (requests/s)"), (right, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 4, 16], ["1", "4", "16"])
        ax.set_xlabel("concurrency (closed loop)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    left.set_title("same checkpoint, every request its own image")
    right.set_title("p99 (mean over rounds)")
    fig.tight_layout()
    fig.savefig(out / "bench_side_by_side.png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- cache


def cache_tables(data: dict[str, Any]) -> str:
    modes = {
        "sequential": "8 separate requests, one at a time",
        "concurrent": "8 separate requests, 8 in flight",
        "one_request": "one /ground with 8 phrases",
    }
    results = data["results"]
    settings = list(results)
    lines = [
        f"{data['images_per_mode']} images per row, 8 distinct phrases each; cache on = NUWA_EMBED_CACHE_MB "
        "default (256), off = 0. `vision ms / request` = mean `timing_ms.vision` of the responses (a batch's "
        "vision time, 0 when every image of it was cached).",
        "",
        "| how the 8 phrases are asked | cache | phrases/s | **on / off** | vision ms / request | cache hits "
        "| p50 ms | p99 ms | mean batch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, title in modes.items():
        for setting in settings:
            row = results[setting][mode]
            gain = data["gains"][mode]["throughput_on_over_off"]
            lines.append(
                f"| {title} | {setting} | {row['phrases_per_s']:.2f} | "
                + (f"**{gain:.2f}x**" if setting == settings[0] else "")
                + f" | {row['mean_vision_ms_per_request']:.1f} | {row['cache_hits']} of {row['phrases']} | "
                f"{fmt(row['p50_ms'], 0)} | {fmt(row['p99_ms'], 0)} | {fmt(row['mean_batch_size'])} |"
            )
    lines += [
        "",
        "One request with 8 phrases vs 8 sequential requests (phrases/s): "
        + "; ".join(f"{s}: {results[s]['one_request_over_sequential']:.2f}x" for s in settings)
        + ".",
        "",
        _loads_line(data),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- sweeps


def batching_gain_tables(data: dict[str, Any]) -> str:
    setting = data["setting"]
    lines = [
        f"Closed loop, every request its own image, clients ask for every visual token; best throughput with "
        f"p99 <= {data['p99_budget_ms']:.0f} ms:",
        "",
        f"| {setting} | best req/s within budget | at concurrency | its p99 ms | mean batch | all points "
        "(c: req/s @ p99 ms, mean batch) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for result in data["results"]:
        best = result["best_within_budget"] or {}
        points = "; ".join(
            f"c{p['concurrency']}: {p['throughput_rps']:.1f} @ {p['p99_ms']:.0f}, b{fmt(p['mean_batch_size'])}"
            for p in result["points"]
        )
        lines.append(
            f"| {result[setting]} | {fmt(best.get('throughput_rps'))} | {fmt(best.get('concurrency'))} | "
            f"{fmt(best.get('p99_ms'), 0)} | {fmt(best.get('mean_batch_size'))} | {points} |"
        )
    bests = {r[setting]: (r["best_within_budget"] or {}).get("throughput_rps") for r in data["results"]}
    base = bests.get(1)
    peaks = {r[setting]: max(p["throughput_rps"] for p in r["points"]) for r in data["results"]}
    if base:
        lines += [
            "",
            "Gain over max batch 1 at the same p99 budget: "
            + ", ".join(f"batch {k}: {v / base:.2f}x" for k, v in bests.items() if v and k != 1)
            + "; peak throughput at any p99: "
            + ", ".join(f"batch {k}: {v:.2f} req/s ({v / peaks[1]:.2f}x)" for k, v in peaks.items())
            + ".",
        ]
    lines += ["", _loads_line(data)]
    return "\n".join(lines)


def two_setting_tables(data: dict[str, Any]) -> str:
    """A setting's two values side by side per concurrency (pipeline depth 1 / 2, follow-up hold off / on)."""
    setting = data["setting"]
    results = {r[setting]: r for r in data["results"]}
    values = list(results)
    first, last = values[0], values[-1]
    lines = [
        "Closed loop, max batch 8, every request its own image, every visual token. `queue` = mean time queued "
        "in the API process, `wait` = mean time a prepared batch waited in the worker for the previous one.",
        "",
        f"| concurrency | {setting} | req/s | **{last} / {first}** | p50 ms | p99 ms | mean batch | "
        "queue ms | wait ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    concurrencies = [p["concurrency"] for p in results[first]["points"]]
    for concurrency in concurrencies:
        by_value = {
            v: next(p for p in results[v]["points"] if p["concurrency"] == concurrency) for v in values
        }
        ratio = by_value[last]["throughput_rps"] / by_value[first]["throughput_rps"]
        for value in values:
            p = by_value[value]
            lines.append(
                f"| {concurrency} | {value} | {p['throughput_rps']:.2f} | "
                + (f"**{ratio:.2f}x**" if value == last else "")
                + f" | {fmt(p['p50_ms'], 0)} | {fmt(p['p99_ms'], 0)} | {fmt(p['mean_batch_size'])} | "
                f"{fmt(p['mean_queue_ms'])} | {fmt(p['mean_wait_ms'])} |"
            )
    lines += ["", _loads_line(data)]
    return "\n".join(lines)


def batching_gain_plot(data: dict[str, Any], out: Path) -> None:
    setting = data["setting"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result in data["results"]:
        points = result["points"]
        ax.plot(
            [p["p99_ms"] for p in points],
            [p["throughput_rps"] for p in points],
            marker="o",
            label=f"{setting} {result[setting]}",
        )
        for p in points:
            ax.annotate(f"c{p['concurrency']}", (p["p99_ms"], p["throughput_rps"]), fontsize=7)
    ax.axvline(data["p99_budget_ms"], color="grey", linestyle="--", linewidth=1, label="p99 budget")
    ax.set_xlabel("p99 latency (ms)")
    ax.set_ylabel("throughput (requests/s)")
    ax.set_title(f"throughput vs p99 per {setting} (closed loop)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench_batching_gain.png", dpi=110)
    plt.close(fig)


SECTIONS = (
    ("request_overhead", "request_overhead.json", overhead_plot, overhead_tables),
    ("side_by_side", "side_by_side.json", side_by_side_plot, side_by_side_tables),
    ("request_spans", "request_spans.json", None, spans_tables),
    ("http_floor", "http_floor.json", None, http_floor_tables),
    ("cache_gain", "cache_gain.json", None, cache_tables),
    ("batching_gain", "batching_gain.json", batching_gain_plot, batching_gain_tables),
    ("pipeline_gain", "pipeline_gain.json", None, two_setting_tables),
    ("follow_ups", "follow_ups.json", None, two_setting_tables),
)


def serving_tables(out: Path) -> dict[str, str]:
    """Plots into `out` and the markdown table of every serving result that exists, by marker name."""
    tables = {}
    for marker, name, plot, table in SECTIONS:
        data = load_result(name)
        if data is None:
            logger.info("no %s yet; skipped", name)
            continue
        if plot is not None:
            plot(data, out)
        tables[marker] = table(data)
    return tables


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serving-core benchmark tables and plots.")
    parser.add_argument("--out", type=Path, default=DOCS)
    parser.add_argument("--doc", type=Path, default=DOCS / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tables = serving_tables(args.out)
    if args.doc.is_file():
        fill_doc(args.doc, tables)
    print("\n\n".join(f"<!-- {k} -->\n{v}" for k, v in tables.items()))


if __name__ == "__main__":
    main()

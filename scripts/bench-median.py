#!/usr/bin/env python3
"""Runs `docket bench` several times and prints the median of each figure.

Usage: scripts/bench-median.py N -- docket bench ARGS...   (adds --json itself)
The runs are interleaved with nothing else; the machine may be shared, so
medians, not means.
"""
import json, statistics, subprocess, sys

n = int(sys.argv[1])
cmd = sys.argv[sys.argv.index("--") + 1:] + ["--json"]
rows = {}
for i in range(n):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        r = json.loads(line)
        rows.setdefault(r["workload"], []).append(r)
for w, rs in rows.items():
    med = {}
    for k in ("enqueue_per_s", "processed_per_s", "p50_ms", "p95_ms", "p99_ms", "wall_s", "peak_rss_mb"):
        vals = [r[k] for r in rs if r[k] is not None]
        if vals:
            med[k] = round(statistics.median(vals), 3)
    ex = {(r["executions_actual"], r["executions_expected"]) for r in rs}
    print(json.dumps({"workload": w, "backend": rs[0]["backend"], "runs": rs[0]["runs"], "n": len(rs), "median": med, "executions": sorted(ex)}))

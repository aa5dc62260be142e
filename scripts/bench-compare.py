#!/usr/bin/env python3
"""Compares two `docket` binaries on the same workloads, runs interleaved
(base, new, base, new, …) so drift on a shared machine hits both alike, and
prints each figure's medians and the ratio new/base.

Usage: scripts/bench-compare.py N BASE_BIN NEW_BIN -- bench ARGS...   (adds --json)
"""
import json, statistics, subprocess, sys

n = int(sys.argv[1])
bins = {"base": sys.argv[2], "new": sys.argv[3]}
args = sys.argv[sys.argv.index("--") + 1:] + ["--json"]
rows = {}
for i in range(n):
    for name, binary in bins.items():
        out = subprocess.run([binary] + args, check=True, capture_output=True, text=True).stdout
        for line in out.splitlines():
            r = json.loads(line)
            rows.setdefault((r["workload"], name), []).append(r)
keys = ("enqueue_per_s", "processed_per_s", "p50_ms", "p95_ms", "p99_ms", "wall_s", "peak_rss_mb")
for w in sorted({w for w, _ in rows}):
    out = {"workload": w, "n": n}
    for k in keys:
        med = {}
        for name in bins:
            vals = [r[k] for r in rows.get((w, name), []) if r[k] is not None]
            if vals:
                med[name] = round(statistics.median(vals), 3)
        if len(med) == 2:
            out[k] = {**med, "ratio": round(med["new"] / med["base"], 3) if med["base"] else None}
    out["executions"] = sorted({(r["executions_actual"], r["executions_expected"]) for name in bins for r in rows.get((w, name), [])})
    print(json.dumps(out))

#!/usr/bin/env python3
"""Usage: scripts/otlp-sink.py 14318 & scripts/bench-traces.py N BASE_BIN NEW_BIN bench W1

W1 (SQLite) with traces off (before: base binary; after: new binary,
no OTEL_*), and on (new binary exporting to a local OTLP/HTTP sink),
interleaved base, off, on, … N times; medians and ratios."""
import json, os, statistics, subprocess, sys
n = int(sys.argv[1]); base, new = sys.argv[2], sys.argv[3]; args = sys.argv[4:] + ["--json"]
clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
on = dict(clean, OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:14318", OTEL_SERVICE_NAME="bench")
variants = [("before", base, clean), ("off", new, clean), ("on", new, on)]
rows = {}
for i in range(n):
    for name, binary, env in variants:
        out = subprocess.run([binary] + args, check=True, capture_output=True, text=True, env=env).stdout
        for line in out.splitlines():
            r = json.loads(line)
            rows.setdefault((r["workload"], name), []).append(r)
            print(name, r["workload"], r.get("processed_per_s"), r.get("enqueue_per_s"), r.get("peak_rss_mb"), file=sys.stderr)
for w in sorted({w for w, _ in rows}):
    out = {"workload": w, "n": n}
    for k in ("enqueue_per_s", "processed_per_s", "p99_ms", "wall_s", "peak_rss_mb"):
        med = {}
        for name, _, _ in variants:
            vals = [r[k] for r in rows.get((w, name), []) if r.get(k) is not None]
            if vals: med[name] = round(statistics.median(vals), 3)
        if len(med) == 3:
            med["off/before"] = round(med["off"] / med["before"], 3)
            med["on/before"] = round(med["on"] / med["before"], 3)
            out[k] = med
    print(json.dumps(out))

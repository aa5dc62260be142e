#!/usr/bin/env python3
# usage: DOCKET_URL=postgres://postgres@127.0.0.1:5432/bench_docket BACKEND=pg W1_N=10000 python3 bench/w1_pg_backend_cpu.py /tmp/peers/docket/target/release/docket-peer-bench
# (after `enqueue-w1`; prints processed runs/s, the worker's CPU, and the CPU of the PostgreSQL backends serving the database)
# Runs docket-peer-bench worker-w1 (env as set) and samples the CPU time of the PostgreSQL backends
# serving the bench database (process title "postgres: 15/main: <user> <db> ..."), every 20 ms.
import os, subprocess, sys, time, json
db = os.environ['DOCKET_URL'].rsplit('/', 1)[1]
tck = os.sysconf('SC_CLK_TCK')
def backends():
    out = {}
    for p in os.listdir('/proc'):
        if not p.isdigit(): continue
        try:
            cmd = open(f'/proc/{p}/cmdline', 'rb').read().decode(errors='replace')
            if cmd.startswith('postgres: ') and f' {db} ' in cmd:
                f = open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()
                out[int(p)] = (int(f[11]) + int(f[12])) / tck
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return out
seen = {}
t0 = time.time()
w = subprocess.Popen(['/usr/bin/time', '-f', '%U %S %e', sys.argv[1], 'worker-w1'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
while w.poll() is None:
    for p, c in backends().items(): seen[p] = max(seen.get(p, 0), c)
    time.sleep(0.02)
out, err = w.communicate()
res = json.loads([l for l in out.splitlines() if l.startswith('RESULT ')][0][7:])
u, s, e = map(float, err.strip().splitlines()[-1].split())
print(json.dumps({"w1_process_per_s": res['w1_process_per_s'], "w1_drain_s": res['w1_drain_s'], "worker_cpu_s": round(u + s, 2),
                  "worker_wall_s": e, "pg_backend_cpu_s": round(sum(seen.values()), 2), "pg_backends": len(seen),
                  "per_backend": sorted(round(v, 2) for v in seen.values()), "loadavg": os.getloadavg()[0]}))

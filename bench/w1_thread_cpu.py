#!/usr/bin/env python3
# usage: DOCKET_URL=sqlite:///path/docket.db BACKEND=sqlite W1_N=10000 python3 bench/w1_thread_cpu.py /tmp/peers/docket/target/release/docket-peer-bench
# (after the docket peer's `enqueue-w1` filled the database; prints processed runs/s, the drain and CPU seconds per thread name)
# Runs `docket-peer-bench worker-w1` and samples each thread's CPU time (by thread name) every 10 ms.
import os, subprocess, sys, time, json
tck = os.sysconf('SC_CLK_TCK')
w = subprocess.Popen([sys.argv[1], 'worker-w1'], stdout=subprocess.PIPE, text=True)
seen = {}
while w.poll() is None:
    try:
        for t in os.listdir(f'/proc/{w.pid}/task'):
            try:
                name = open(f'/proc/{w.pid}/task/{t}/comm').read().strip()
                f = open(f'/proc/{w.pid}/task/{t}/stat').read().rsplit(')', 1)[1].split()
                seen[(name, t)] = (int(f[11]) + int(f[12])) / tck
            except (FileNotFoundError, ProcessLookupError):
                pass
    except FileNotFoundError:
        pass
    time.sleep(0.01)
out = w.stdout.read()
res = json.loads([l for l in out.splitlines() if l.startswith('RESULT ')][0][7:])
by = {}
for (n, _), c in seen.items(): by[n] = round(by.get(n, 0) + c, 2)
print(json.dumps({"w1_process_per_s": res['w1_process_per_s'], "w1_drain_s": res['w1_drain_s'], "cpu_s_by_thread": by, "load": os.getloadavg()[0]}))

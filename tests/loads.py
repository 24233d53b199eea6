"""Load programs for tests and benchmarks (run with ``python -S -c PROGRAM ARGS``)."""

#: argv: cgroup directories, then seconds. One fork per cgroup, placed there
#: from outside while it is stopped and off its CPU (as container runtimes
#: place a workload: a task that moves itself has a slice that began in the
#: cgroup it came from, which the kernel splits and meter does not; see
#: docs/architecture.md, "CPU time"); then each wakes every 1 ms until the
#: time is up.
WAKERS = """
import os, signal, sys, time
roots, seconds = sys.argv[1:-1], float(sys.argv[-1])
kids = []
def run_time(pid):
    with open(f"/proc/{pid}/schedstat") as f:
        return f.read().split()[0]
for cg in roots:
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), signal.SIGSTOP)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.001)
        os._exit(0)
    os.waitpid(pid, os.WUNTRACED)
    while True:
        first = run_time(pid)
        time.sleep(0.002)
        if run_time(pid) == first:
            break
    with open(cg + "/cgroup.procs", "w") as f:
        f.write(str(pid))
    kids.append(pid)
for pid in kids:
    os.kill(pid, signal.SIGCONT)
for pid in kids:
    os.waitpid(pid, 0)
"""

#: argv: a cgroup directory, then n. n times: a child cgroup made, a process
#: forked into it for 2 ms of work, reaped, and the cgroup removed.
CHURN = """
import os, sys, time
parent, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = f"{parent}/run{i}"
    os.mkdir(d)
    pid = os.fork()
    if pid == 0:
        with open(d + "/cgroup.procs", "w") as f:
            f.write("0")
        end = time.monotonic() + 0.002
        while time.monotonic() < end:
            pass
        os._exit(0)
    os.waitpid(pid, 0)
    os.rmdir(d)
"""

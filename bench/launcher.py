"""The measuring launcher shared by the bench scripts (they run as scripts, so this sits beside them).

LAUNCHER is run as `python -S -c LAUNCHER RESULT CMD...`: it spawns CMD, waits with wait4 and writes
[wall s, ru_maxrss KiB, user+sys CPU s] of that child alone to RESULT, then exits with the child's code.
"""

LAUNCHER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    json.dump([wall, usage.ru_maxrss, usage.ru_utime + usage.ru_stime], f)
sys.exit(os.waitstatus_to_exitcode(status))
"""

"""A/B of how a transplant writes its output: with O_DIRECT or through the page cache.

An O_DIRECT output is not left in the page cache, so a command that reads it soon after (`verify`,
a load) reads it from disk. This bench measures that cost too. Each round runs three writers in a
seeded random order:

- `surgery transplant --manifest --top-k K` with `SURGERY_DIRECT_IO=1` (O_DIRECT where the
  filesystem takes it: the default only for a checkpoint larger than half the memory available);
- the same with `SURGERY_DIRECT_IO=0` (through the page cache, writeback behind the writer: the
  default for a checkpoint that fits);
- `cp -r target && sync`.

After each writer, `cat` reads the output back twice: first as the writer left it (what a command
run right after pays), then again with the page cache emptied (from disk). Writes start after a
`sync`, the page cache emptied, and --settle seconds. Needs Linux and root (it writes
/proc/sys/vm/drop_caches).

    .venv/bin/python bench/direct_write_bench.py --workdir W --shard-gb 0.5 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from transplant_bench import DROP_CACHES, GIB, fresh, make_pair, measure, pick_modules, surgery_cmd, write_manifest


def read_back(folder: Path, drop: bool) -> float:
    """Seconds for `cat` to read every file of `folder`; with `drop`, after `sync` and emptying the page cache."""
    if drop:
        subprocess.run(["sync"], check=True)
        DROP_CACHES.write_text("3\n")
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    t0 = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}, {max(xs):.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True, help="where the pair and the outputs go (kept)")
    ap.add_argument("--size-gb", type=float, default=4.0, help="checkpoint size, GiB")
    ap.add_argument("--shard-gb", type=float, default=0.5, help="max shard size, GiB")
    ap.add_argument("--modules", type=int, default=32, help="K, number of modules transplanted")
    ap.add_argument("--repeat", type=int, default=3, help="rounds")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds to wait after `sync`, before each write")
    args = ap.parse_args()
    if not os.access(DROP_CACHES, os.W_OK):
        ap.error(f"this bench writes {DROP_CACHES}, which needs Linux and root")

    root = args.workdir
    root.mkdir(parents=True, exist_ok=True)
    pair = make_pair(root, args.size_gb, args.shard_gb, seed=0)
    manifest = write_manifest(pair, root / "manifest-direct.json")
    out = root / "out-direct-bench"
    k = len(pick_modules(pair.cfg, args.modules))
    transplant = [*surgery_cmd(), "transplant", "-t", str(pair.target), "-s", str(pair.source), "-o", str(out),
                  "-m", str(manifest), "-k", str(k), "-q"]  # fmt: skip
    writers = {
        "transplant, O_DIRECT (SURGERY_DIRECT_IO=1)": ["env", "SURGERY_DIRECT_IO=1", *transplant],
        "transplant, page cache (SURGERY_DIRECT_IO=0)": ["env", "SURGERY_DIRECT_IO=0", *transplant],
        "cp -r target && sync": ["sh", "-c", f"cp -r '{pair.target}' '{out}' && sync"],
    }
    times: dict[str, dict[str, list[float]]] = {w: {"write": [], "read": [], "disk": []} for w in writers}
    rng = random.Random(0)
    for r in range(args.repeat):
        order = list(writers)
        rng.shuffle(order)
        print(f"round {r + 1}/{args.repeat}: {' > '.join(order)}", file=sys.stderr)
        for name in order:
            fresh(out)
            wall, _ = measure(writers[name], root, args.settle, drop=True)
            times[name]["write"].append(wall)
            times[name]["read"].append(read_back(out, drop=False))
            times[name]["disk"].append(read_back(out, drop=True))
    shutil.rmtree(out, ignore_errors=True)

    print(f"{pair.nbytes / GIB:.2f} GiB pair, K = {k}, {args.repeat} rounds; seconds, median [min, max]\n")
    print("| writer | write | read back right after | read back from disk | write + read right after |")
    print("|---|---:|---:|---:|---:|")
    for name, t in times.items():
        both = [w + r for w, r in zip(t["write"], t["read"], strict=True)]
        print(f"| {name} | {spread(t['write'])} | {spread(t['read'])} | {spread(t['disk'])} | {spread(both)} |")
    cp = times["cp -r target && sync"]
    print()
    for name in list(writers)[:2]:
        t = times[name]
        ratio = [a / b for a, b in zip(t["write"], cp["write"], strict=True)]
        total = [(a + b) / (c + d) for a, b, c, d in zip(t["write"], t["read"], cp["write"], cp["read"], strict=True)]
        print(f"- {name}: write / cp -r && sync {spread(ratio)}x; (write + read right after) / same {spread(total)}x")


if __name__ == "__main__":
    main()

"""Why a file just written with O_DIRECT reads back slowly on some machines: the cost of fresh pages.

A read through the page cache puts each byte in a page the kernel allocates. On bare metal a free
page costs nothing to hand out. In a virtual machine with free page reporting (virtio-balloon
feature bit 5, VIRTIO_BALLOON_F_REPORTING: on in the Firecracker VMs we measure on), pages that stay
free for about two seconds are reported to the host, which discards them; the next use of such a
page is a fault the host must serve, at the host's page-fault rate. An output written with
O_DIRECT leaves no pages behind, so its first reader allocates fresh ones (long free, so reported);
one written through the page cache paid for its pages during the write, and pages freed a moment
ago (by emptying the page cache) are handed out again before they are reported.

Each round, in a seeded random order, measures:

- `anon touch`: first write to every page of a fresh anonymous mapping of --gb GiB (the raw cost of
  pages the guest has not touched, no disk involved);
- `read after O_DIRECT`: write a --gb GiB file with O_DIRECT, then read it through the page cache;
- `read after drop`: the same file after `sync` and emptying the page cache (the pages just freed
  are handed out again, already backed by the host);
- `read after drop, 10 s idle`: the same, after 10 s in which the freed pages are reported;
- `read after page-cache write`: write the file through the page cache, `fsync`, then read it
  (its pages are still cached: what a command right after a page-cache transplant pays).

Needs Linux and root (it writes /proc/sys/vm/drop_caches).

    .venv/bin/python bench/fresh_pages_bench.py --workdir W --gb 1 --repeat 3
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from transplant_bench import DROP_CACHES, GIB

BLOCK = 8 * 2**20
PAGE = mmap.PAGESIZE
IDLE_S = 10  # long past the ~2 s after which free pages are reported to the host


def drop_caches() -> None:
    os.sync()
    DROP_CACHES.write_text("3\n")


def anon_touch(gb: float) -> float:
    """Seconds to write one byte into every page of a fresh anonymous mapping of `gb` GiB."""
    n = int(gb * GIB)
    m = mmap.mmap(-1, n)
    start = time.perf_counter()
    for off in range(0, n, PAGE):
        m[off] = 1
    took = time.perf_counter() - start
    m.close()
    return took


def write_file(path: Path, gb: float, *, direct: bool) -> None:
    """Write `gb` GiB of non-zero bytes to `path`, with O_DIRECT or through the page cache (then fsync)."""
    block = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
    block.write(os.urandom(BLOCK))
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o644)
    try:
        for _ in range(int(gb * GIB) // BLOCK):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
        block.close()


def read_file(path: Path) -> float:
    """Seconds to read `path` through the page cache."""
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(BLOCK):
            pass
    return time.perf_counter() - start


def case_read_after_direct(path: Path, gb: float) -> float:
    write_file(path, gb, direct=True)
    return read_file(path)


def case_read_after_drop(path: Path, gb: float) -> float:
    write_file(path, gb, direct=True)
    drop_caches()
    return read_file(path)


def case_read_after_drop_and_idle(path: Path, gb: float) -> float:
    write_file(path, gb, direct=True)
    drop_caches()
    time.sleep(IDLE_S)
    return read_file(path)


def case_read_after_cached_write(path: Path, gb: float) -> float:
    write_file(path, gb, direct=False)
    return read_file(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True, help="a folder on the disk to measure")
    ap.add_argument("--gb", type=float, default=1.0, help="GiB per file and per mapping")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not os.access(DROP_CACHES, os.W_OK):
        ap.error(f"this bench writes {DROP_CACHES}, which needs Linux and root")
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / "fresh-pages.bin"
    cases: dict[str, Callable[[], float]] = {
        "anon touch": lambda: anon_touch(args.gb),
        "read after O_DIRECT write": lambda: case_read_after_direct(path, args.gb),
        "read after drop": lambda: case_read_after_drop(path, args.gb),
        f"read after drop, {IDLE_S} s idle": lambda: case_read_after_drop_and_idle(path, args.gb),
        "read after page-cache write": lambda: case_read_after_cached_write(path, args.gb),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    rng = random.Random(args.seed)
    for _ in range(args.repeat):
        order = list(cases)
        rng.shuffle(order)
        for name in order:
            drop_caches()  # every case starts from the same state: nothing of the file cached
            times[name].append(cases[name]())
    path.unlink(missing_ok=True)
    print(f"{args.gb:g} GiB, {args.repeat} rounds; GB/s median [min, max]")
    for name, ts in times.items():
        rates = sorted(args.gb * GIB / 1e9 / t for t in ts)
        print(f"  {name:28s} {statistics.median(rates):5.2f} [{rates[0]:.2f}, {rates[-1]:.2f}]")
    print("free page reporting (virtio-balloon feature bit 5):", _free_page_reporting())


def _free_page_reporting() -> str:
    for device in sorted(Path("/sys/bus/virtio/devices").glob("*")):
        if (device / "device").read_text().strip() == "0x0005":  # a virtio balloon
            return "on" if (device / "features").read_text()[5] == "1" else "off"
    return "no virtio balloon"


if __name__ == "__main__":
    main()

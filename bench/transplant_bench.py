"""Benchmark `surgery transplant` against `cp -r` and a naive from_pretrained/save_pretrained script.

Writes synthetic Llama-shaped sharded bf16 checkpoints (random bytes, streamed to disk, never
held in RAM), then measures wall time and peak RSS of each method in a fresh child process.

    .venv/bin/python bench/transplant_bench.py                       # 4 GiB pair + 1 GiB naive pair
    .venv/bin/python bench/transplant_bench.py --size-gb 0.2 --shard-gb 0.1 --naive-gb 0.1 --verify

Peak RSS is the child's ru_maxrss from os.wait4: the largest RSS of any process in the child's
tree (Linux folds reaped grandchildren into it), in MiB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from launcher import LAUNCHER  # bench/ is on sys.path when this runs as a script
from transformers import LlamaConfig

GIB = 2**30
MIB = 2**20
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
CHUNK = 64 * MIB  # write granularity: bounds the generator's memory, big enough to be disk-bound
VOCAB = 32000
PROJS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

# The naive way: materialise both models, copy parameters, save. Run in its own process so
# its peak RSS is measured alone. argv: out target source module...
NAIVE_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
out, target, source, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
tgt = AutoModelForCausalLM.from_pretrained(target, dtype=torch.bfloat16)
src = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
with torch.no_grad():
    for name in names:
        for pname, p in tgt.get_submodule(name).named_parameters():
            p.copy_(src.get_submodule(name).get_parameter(pname))
tgt.save_pretrained(out)
"""


# ----------------------------------------------------------------------------- synthetic checkpoints


def llama_config(hidden: int, layers: int) -> LlamaConfig:
    # head_dim 128 and intermediate ~8/3 hidden (rounded to 256) as in Llama; untied head like Llama 2/3 8B.
    heads = max(1, hidden // 128)
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=256 * math.ceil(hidden * 8 / 3 / 256),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def tensor_list(cfg: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a LlamaForCausalLM state dict, in module order."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    shapes = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }
    out = [("model.embed_tokens.weight", (cfg.vocab_size, h))]
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}"
        out += [(f"{p}.{proj}.weight", shapes[proj]) for proj in PROJS]
        out += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (cfg.vocab_size, h))]
    return out


def nbytes(shape: tuple[int, ...]) -> int:
    return 2 * math.prod(shape)  # bf16


def pick_config(total: int) -> LlamaConfig:
    """The narrowest Llama whose depth (for ~`total` bytes) is at most hidden/128, as real Llamas are.

    Width is swept and depth solved for, so the size lands within one layer of the request.
    """
    for hidden in range(256, 32768, 256):
        one = llama_config(hidden, 1)
        embed = sum(nbytes(s) for n, s in tensor_list(one) if "layers." not in n)
        per_layer = sum(nbytes(s) for n, s in tensor_list(one) if "layers." in n)
        layers = max(8, round((total - embed) / per_layer))  # >= 8 so 32 modules can spread over layers
        if layers <= max(8, hidden // 128):
            return llama_config(hidden, layers)
    raise ValueError(f"no config for {total} bytes")


def assign_shards(tensors: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list]:
    """Greedy, in order, as save_pretrained does: start a new shard when the next tensor would overflow."""
    shards: list[list] = [[]]
    size = 0
    for name, shape in tensors:
        if shards[-1] and size + nbytes(shape) > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes(shape)
    return shards


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], rng: np.random.SFC64) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in tensors:
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nbytes(shape)]}
        off += nbytes(shape)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, shape in tensors:
            left = nbytes(shape)
            while left:
                n = min(left, CHUNK)
                # SFC64 raw output runs at ~1.5 GB/s, several times os.urandom; the bytes need not be floats.
                f.write(rng.random_raw(-(-n // 8)).view(np.uint8)[:n])
                left -= n


def write_checkpoint(folder: Path, cfg: LlamaConfig, shard_bytes: int, seed: int) -> int:
    """Write a sharded checkpoint; the index goes last, so its presence means the folder is complete."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = assign_shards(tensor_list(cfg), shard_bytes)
    rng = np.random.SFC64(seed)
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_shard(folder / name, tensors, rng)
        for t, shape in tensors:
            weight_map[t] = name
            total += nbytes(shape)
    config = {**cfg.to_dict(), "architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16", "dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


@dataclass
class Pair:
    target: Path
    source: Path
    cfg: LlamaConfig
    nbytes: int


def make_pair(root: Path, size_gb: float, shard_gb: float, seed: int) -> Pair:
    """Target and source of the same shapes, different bytes. Reused if a complete pair is already there."""
    cfg = pick_config(int(size_gb * GIB))
    folder = root / f"pair-{size_gb:g}g-{shard_gb:g}g"
    target, source = folder / "target", folder / "source"
    total = sum(nbytes(s) for _, s in tensor_list(cfg))
    for path, s in ((target, seed), (source, seed + 1)):
        if (path / "model.safetensors.index.json").is_file():
            continue
        t0 = time.perf_counter()
        write_checkpoint(path, cfg, int(shard_gb * GIB), s)
        print(f"wrote {path} ({total / GIB:.2f} GiB) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return Pair(target, source, cfg, total)


def pick_modules(cfg: LlamaConfig, k: int) -> list[str]:
    """K projection modules spread evenly over all layers, cycling through q/k/v/o/gate/up/down."""
    names = [f"model.layers.{layer}.{p}" for layer in range(cfg.num_hidden_layers) for p in PROJS]
    return [names[j * len(names) // k] for j in range(k)]


# ----------------------------------------------------------------------------- measurement


def measure(cmd: list[str], root: Path, settle: float, drop: bool = False) -> tuple[float, float]:
    """Run `cmd` in a fresh child; return (wall seconds, peak RSS MiB). Fails loudly on a nonzero exit.

    The child is spawned by a bare `python -S` launcher, not by this process: Linux folds the
    pre-exec address space's high-water mark into the child's ru_maxrss, so spawning straight from
    this ~350 MiB process (transformers is imported) would report >= 350 MiB even for `cp`. The
    launcher's own ~10 MiB is the floor of every figure. `drop` empties the page cache first, so the
    command reads its inputs from disk, whatever ran before it.
    """
    subprocess.run(["sync"], check=True)  # flush earlier writes so they don't land in this timing
    if drop:
        DROP_CACHES.write_text("3\n")
    # `sync` returns once the guest's writes reach the virtual disk; the host may still be writing them
    # out, and a command started at once pays for the one before it. Waiting evens out the start.
    time.sleep(settle)
    result = root / ".measure.json"
    launcher = [sys.executable, "-S", "-c", LAUNCHER, str(result)]
    env = {**os.environ, "SURGERY_CACHE": str(root / "cache")}  # the bench's own candidate cache
    proc = subprocess.run([*launcher, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {proc.returncode}:\n{proc.stdout.decode(errors='replace')}")
    wall, maxrss_kib, _cpu = json.loads(result.read_text())
    return wall, maxrss_kib / 1024  # ru_maxrss is KiB on Linux


def surgery_cmd() -> list[str]:
    # The console script beside this interpreter; `python -m surgery.cli` would import it and do nothing.
    exe = Path(sys.executable).with_name("surgery")
    return [str(exe)] if exe.is_file() else [sys.executable, "-c", "from surgery.cli import main; main()"]


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def disk_gib(folder: Path) -> float:
    """GiB of the files written into `folder`: hard links to files elsewhere (`--link`) are not counted."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.stat().st_nlink == 1) / GIB


@dataclass
class Case:
    """One command measured once per round. `out` is removed before each run (tools refuse to overwrite);
    `cold` names the folder of the bench's surgery cache to empty first: `candidates` (the first run of
    a layout) or `digests` (the first patch of a target)."""

    label: str
    cmd: list[str]
    out: Path | None = None
    cold: str | None = None
    runs: list[tuple[float, float]] = field(default_factory=list)  # (wall s, peak RSS MiB) per round

    @property
    def walls(self) -> list[float]:
        return [w for w, _ in self.runs]


def run_rounds(groups: list[list[Case]], root: Path, repeat: int, settle: float, drop: bool) -> None:
    """Run every case once per round, `repeat` rounds; a ratio is taken within a round, so the
    machine's drift between rounds (the disk here moved `cp -r && sync` between 2 s and 7 s from one
    minute to the next) does not skew it.

    Each round runs the groups in its own seeded random order (a group's cases stay together, in
    their order: `verify` reads what the case before it wrote), so that no command always follows
    the same heavy writer: on this disk the command after a 4 GiB write ran up to 2x slower.
    """
    rng = random.Random(0)
    for i in range(repeat):
        order = rng.sample(groups, len(groups))
        print(f"round {i + 1}/{repeat}: {' > '.join(g[0].label for g in order)}", file=sys.stderr, flush=True)
        for case in (c for group in order for c in group):
            if case.out is not None:
                fresh(case.out)
            if case.cold is not None:
                fresh(root / "cache" / case.cold)
            case.runs.append(measure(case.cmd, root, settle, drop))


def spread(values: list[float], fmt: str = ".2f") -> str:
    """The median and, with more than one value, [min, max]."""
    mid = format(statistics.median(values), fmt)
    return mid if len(values) == 1 else f"{mid} [{format(min(values), fmt)}, {format(max(values), fmt)}]"


def ratio(a: Case, b: Case) -> str:
    """a / b per round, as median [min, max] over the rounds."""
    return spread([x / y for x, y in zip(a.walls, b.walls, strict=True)]) + "x"


def write_manifest(pair, path: Path) -> Path:
    """A seeded random-ranking manifest for the pair, made with surgery's own API."""
    from surgery import find_candidates, open_checkpoint, save_manifest
    from surgery.analysis.ranking import build_manifest

    src, tgt = open_checkpoint(pair.source), open_checkpoint(pair.target)
    save_manifest(build_manifest("random", find_candidates(src, tgt), source=src, target=tgt, seed=0), path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=4.0, help="main checkpoint size, GiB")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="max shard size, GiB")
    ap.add_argument("--naive-gb", type=float, default=1.0, help="size of the pair the naive script runs on, GiB")
    ap.add_argument("--modules", type=int, default=32, help="K, number of modules transplanted")
    ap.add_argument("--workdir", type=Path, help="where checkpoints go (default: a temp dir, deleted after)")
    ap.add_argument("--keep", action="store_true", help="keep the temp workdir")
    ap.add_argument("--verify", action="store_true", help="also time `surgery verify` on each transplant output")
    ap.add_argument("--repeat", type=int, default=3, help="rounds: every command runs once per round")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds to wait after `sync`, before each command")
    ap.add_argument("--drop-caches", action="store_true",
                    help="empty the page cache before each command (Linux, root): each reads from disk")  # fmt: skip
    args = ap.parse_args()
    if args.drop_caches and not os.access(DROP_CACHES, os.W_OK):
        ap.error(f"--drop-caches writes {DROP_CACHES}, which needs Linux and root; run without it")

    root = args.workdir or Path(tempfile.mkdtemp(prefix="transplant-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        run(args, root)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif args.keep:
            print(f"kept {root}", file=sys.stderr)


def run(args: argparse.Namespace, root: Path) -> None:
    main_pair = make_pair(root, args.size_gb, args.shard_gb, seed=0)
    naive_pair = make_pair(root, args.naive_gb, args.shard_gb, seed=2)
    surgery = surgery_cmd()
    pairs = [main_pair] if naive_pair.target == main_pair.target else [main_pair, naive_pair]
    n = args.repeat
    cache = ", the page cache dropped" if args.drop_caches else ""
    print(f"{n} rounds, every command once per round, in a seeded random order per round, {args.settle:g} s after"
          f" `sync`{cache} before each; median [min, max] over the rounds\n")  # fmt: skip
    print("| method | checkpoint GiB | wall s | peak RSS MiB |")
    print("|---|---:|---:|---:|")
    summary: list[str] = []
    for k, pair in enumerate(pairs):
        gib, tgt, src = pair.nbytes / GIB, str(pair.target), str(pair.source)
        names = pick_modules(pair.cfg, args.modules)
        flags = [f for name in names for f in ("--module", name)]
        out, cp_out = root / f"out-transplant-{k}", root / f"out-cp-{k}"
        manifest = write_manifest(pair, root / f"manifest-{k}.json")
        by_name = [*surgery, "transplant", "-t", tgt, "-s", src, "-o", str(out), *flags, "-q"]
        transplant = Case(f"surgery transplant --manifest --top-k {len(names)}",
                          [*surgery, "transplant", "-t", tgt, "-s", src, "-o", str(out), "-m", str(manifest), "-k",
                           str(len(names)), "-q"], out)  # fmt: skip
        # Selecting by name has no manifest to vouch for the candidates, so the first run of a layout builds
        # the model on the meta device (imports torch + transformers); later runs read the candidate cache.
        module_cold = Case(
            f"surgery transplant --module x{len(names)}, first run of this layout", by_name, out, "candidates"
        )
        module = Case(f"surgery transplant --module x{len(names)}, candidates cached", by_name, out)
        # `compat` does transplant's fixed work (find the candidates), no copying: the start-up floor.
        compat_cold = Case("surgery compat (start-up floor), first run of this layout",
                           [*surgery, "compat", src, tgt], None, "candidates")  # fmt: skip
        compat = Case("surgery compat (start-up floor), candidates cached", [*surgery, "compat", src, tgt])
        cp = Case("cp -r target", ["cp", "-r", tgt, str(cp_out)], cp_out)
        # surgery fsyncs its output; plain cp leaves it in the page cache, so show the fair comparison too.
        cp_sync = Case("cp -r target && sync", ["sh", "-c", f"cp -r '{tgt}' '{cp_out}' && sync"], cp_out)
        # Right after `module`'s run, `out` holds a transplant of the same selection: verify checks it.
        verify = Case("surgery verify (the --module output)", [*surgery, "verify", str(out), "-t", tgt, "-s", src])
        groups = [[transplant], [module_cold], [module, verify] if args.verify else [module], [compat_cold], [compat]]
        if k == 0:
            # Issue 15: --patch, apply (of that patch) and --link (a selection inside one shard).
            patch, applied, linked = root / "out-patch", root / "out-apply", root / "out-link"
            patch_cmd = [*surgery, "transplant", "-t", tgt, "-s", src, "-m", str(manifest), "-k", str(len(names)),
                         "-q", "--patch", "-o", str(patch)]  # fmt: skip
            # A patch records the sha256 of the target's tensors it replaces; they are cached per shard file,
            # so only the first patch of a target reads (and hashes) those tensors.
            patch_first = Case(f"surgery transplant --patch -k {len(names)}, first patch of this target", patch_cmd,
                               patch, "digests")  # fmt: skip
            patch_case = Case(f"surgery transplant --patch -k {len(names)}, target digests cached", patch_cmd, patch)
            measure(patch_cmd, root, 0.0)  # fills the digest cache ("cached" may come first), and gives the size
            patch_mib = math.ceil(disk_gib(patch) * 1024)
            fresh(patch)
            # A plain durable write of as many bytes as the patch: dd, one fdatasync at the end, nothing read or hashed.
            floor_out = root / "out-dd"
            floor = Case(f"dd {patch_mib} MiB conv=fdatasync (the patch's bytes, written durably)",
                         ["sh", "-c", f"mkdir '{floor_out}' && dd if=/dev/zero of='{floor_out}/patch' bs=1M "
                          f"count={patch_mib} conv=fdatasync status=none"], floor_out)  # fmt: skip
            apply = Case(f"surgery apply (the -k {len(names)} patch)",
                         [*surgery, "apply", str(patch), "-t", tgt, "-o", str(applied), "-q"], applied)  # fmt: skip
            one_shard = [f for p in PROJS for f in ("--module", f"model.layers.0.{p}")]
            link = Case(f"surgery transplant --link (layer 0, {len(PROJS)} modules, one shard)",
                        [*surgery, "transplant", "-t", tgt, "-s", src, *one_shard, "--link", "-o", str(linked), "-q"],
                        linked)  # fmt: skip
            # Checkpoints larger than half the memory available are written with O_DIRECT; force it here, where
            # the pair fits (the page cache would not help a model larger than memory).
            direct = Case(f"surgery transplant --manifest --top-k {len(names)}, O_DIRECT forced",
                          ["env", "SURGERY_DIRECT_IO=1", *transplant.cmd], out)  # fmt: skip
            # A patch is written with O_DIRECT whatever its size; the other way, and `apply` reading that patch.
            patch_paged = Case(f"surgery transplant --patch -k {len(names)}, page cache forced, digests cached",
                               ["env", "SURGERY_DIRECT_IO=0", *patch_cmd], patch)  # fmt: skip
            apply_paged = Case(f"surgery apply (the -k {len(names)} patch written through the page cache)",
                               apply.cmd, applied)  # fmt: skip
            groups += [[patch_first], [patch_case, apply], [floor], [link], [direct], [patch_paged, apply_paged]]
        groups += [[cp], [cp_sync]]
        if pair is naive_pair:
            nout = root / "out-naive"
            groups.append([Case("naive from_pretrained + swap + save_pretrained",
                                [sys.executable, "-c", NAIVE_SCRIPT, str(nout), tgt, src, *names], nout)])  # fmt: skip
        measure(compat.cmd, root, 0.0)  # fill the candidate cache: "cached" cases may come first in a round
        run_rounds(groups, root, n, args.settle, args.drop_caches)
        cases = [c for group in groups for c in group]
        for case in cases:
            print(f"| {case.label} | {gib:.2f} | {spread(case.walls)} | {max(r for _, r in case.runs):.0f} |")
        summary.append(f"At {gib:.2f} GiB, per round: transplant --manifest / cp -r && sync "
                       f"{ratio(transplant, cp_sync)}; --module (cached) / cp -r && sync {ratio(module, cp_sync)}"
                       f"; transplant --manifest / cp -r {ratio(transplant, cp)}")  # fmt: skip
        if k == 0:
            size = disk_gib(patch)
            for label, case in (("first patch of a target", patch_first), ("target digests cached", patch_case)):
                summary.append(f"--patch ({label}) / cp -r {ratio(case, cp)}, / cp -r && sync {ratio(case, cp_sync)}"
                               f", / its bytes written durably (dd) {ratio(case, floor)}")  # fmt: skip
            summary.append(f"dd of the patch's size / cp -r {ratio(floor, cp)}: a plain durable write of its bytes")
            summary.append(f"--patch size {size / gib:.3f}x the target's ({size * 1024:.1f} MiB)")
            summary.append(f"apply / transplant --manifest {ratio(apply, transplant)}; of the patch written through "
                           f"the page cache {ratio(apply_paged, transplant)}")  # fmt: skip
            summary.append(f"page cache forced: --patch / cp -r {ratio(patch_paged, cp)}")
            summary.append(f"O_DIRECT forced: transplant --manifest / cp -r && sync {ratio(direct, cp_sync)}")
            summary.append(f"--link / cp -r && sync {ratio(link, cp_sync)}, {disk_gib(linked) * 1024:.0f} MiB written"
                           f" (the rest linked)")  # fmt: skip
        for folder in (out, cp_out, *(root / f"out-{x}" for x in ("patch", "apply", "link", "dd", "naive"))):
            fresh(folder)
    print()
    for line in summary:
        print(f"- {line}")


if __name__ == "__main__":
    main()

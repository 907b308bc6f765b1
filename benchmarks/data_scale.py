"""Pretraining data at scale: decoding throughput, the decoded-image cache on disk, memory of 1 vs 2 torchrun
processes, step rate from the memory map vs RAM, and time to the first step when the cache exists.

    python benchmarks/data_scale.py --data /scratch/jpegs --images 100000      # the issue's size
    python benchmarks/data_scale.py --data /tmp/jpegs --images 2000 --subset 300 --rate-steps 20   # a quick look

1. Generates (once; seeded, resumable) a folder of ``--images`` JPEGs, 200–1024 px on the longer side, aspect ratios
   log-uniform in [9:16, 16:9] (smooth colour fields plus a noise texture, quality 90).
2. Decoding throughput: on the same ``--subset`` images per round, 1 and 2 worker processes, JPEG draft mode on and
   off, interleaved over ``--rounds`` rounds (the file bytes are read once before the round so every alternative
   finds them in the page cache); images/s, CPU milliseconds per image and cores in use (medians over rounds) and
   ratios. The CPU time per image shows the cost of the work whatever share of a busy machine it got.
3. The cache for the whole folder (2 workers, draft mode): build time and size on disk, next to the JPEGs' size.
4. Peak memory of one ``fewshot pretrain`` (MAE, ViT-tiny at ``--img-size``) against 2 torchrun processes
   (gloo), both reading the memory-mapped cache for one epoch: the sums over the job's processes of PSS
   (proportional set size: a page shared by 2 processes counts half in each, so the page cache's one copy counts
   once) and of RSS (which counts shared pages in every process).
5. Step rate from the memory map (``pretrain.data.memory_gb=0``) vs a copy in RAM (``memory_gb=1000``),
   ``--rate-steps`` steps each, interleaved A, B, A, B.
6. Time from starting the command to the first finished step, the cache already built, both placements, against
   the time to import fewshot's training module; then (``--startup-only`` runs just this) a second run's start-up
   phase by phase in one process: imports, listing the folder, building the model, opening the cache, first step.
Everything runs on the CPU; results are printed and written to ``WORK/data_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- the images


_NOISE: np.ndarray | None = None  # one texture tile per generating process, cropped at a seeded offset per image


def _write_jpeg(args: tuple[Path, int]) -> int:
    from PIL import Image

    global _NOISE
    folder, i = args
    path = folder / f"{i // 1000:03d}" / f"img{i:06d}.jpg"
    if path.exists():
        return 0
    if _NOISE is None:
        _NOISE = np.random.default_rng(12345).integers(-6, 7, (1100, 1100, 3), dtype=np.int16)
    rng = np.random.default_rng(i)
    longer = int(rng.integers(200, 1025))
    ratio = math.exp(rng.uniform(math.log(9 / 16), math.log(16 / 9)))  # width / height
    w, h = (longer, max(1, round(longer / ratio))) if ratio >= 1 else (max(1, round(longer * ratio)), longer)
    field = rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(field).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    y, x = rng.integers(0, 1100 - h + 1), rng.integers(0, 1100 - w + 1)
    img = np.clip(img + _NOISE[y : y + h, x : x + w], 0, 255).astype(np.uint8)  # some texture for the encoder
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    Image.fromarray(img).save(tmp, format="JPEG", quality=90)
    tmp.rename(path)
    return 1


def generate(folder: Path, n: int, processes: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with Pool(processes) as pool:
        made = sum(pool.imap_unordered(_write_jpeg, [(folder, i) for i in range(n)], chunksize=64))
    print(f"generated {made} JPEGs ({n - made} existed) in {time.perf_counter() - start:.0f} s", flush=True)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.jpg"))


# ---------------------------------------------------------------------------------------------- decoding


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (decoding workers), user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def decode_rounds(images: object, side: int, subset: int, rounds: int, work: Path) -> dict[str, dict[str, list]]:
    """images/s and CPU ms per image of each (workers, draft) alternative, interleaved: one round = every
    alternative on the same subset (a different subset per round), in a rotated order. On a shared machine the
    wall-clock rate depends on the CPU share the others leave; the CPU time per image does not."""
    from dataclasses import replace

    from fewshot.decoding import decode_to_file

    alternatives = [(1, True), (2, True), (1, False), (2, False)]
    names = [f"{w} worker(s), draft {'on' if d else 'off'}" for w, d in alternatives]
    rates: dict[str, dict[str, list]] = {k: {"images_per_s": [], "cpu_ms_per_image": [], "cores": []} for k in names}
    records = images.records  # type: ignore[attr-defined]
    for r in range(rounds):
        part = replace(images, records=records[r * subset : (r + 1) * subset])  # type: ignore[type-var]
        for rec in part.records:  # into the page cache: every alternative reads the bytes from memory
            rec.file.read_bytes()
        path = work / "decode.u8"
        order = alternatives[r % 4 :] + alternatives[: r % 4]
        for workers, draft in order:
            with open(path, "wb") as f:
                f.truncate(len(part.records) * 3 * side * side)
            start, cpu = time.perf_counter(), _cpu_seconds()
            sizes, _ = decode_to_file(part, range(len(part.records)), path, side, draft, workers)
            wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
            name = f"{workers} worker(s), draft {'on' if draft else 'off'}"
            rates[name]["images_per_s"].append(len(sizes) / wall)
            rates[name]["cpu_ms_per_image"].append(1000 * cpu / len(sizes))
            rates[name]["cores"].append(cpu / wall)
            print(f"  round {r + 1}: {name}: {len(sizes) / wall:.0f} images/s, {1000 * cpu / len(sizes):.2f} CPU ms "
                  f"per image, {cpu / wall:.2f} cores in use", flush=True)  # fmt: skip
        path.unlink()
    return rates


# ---------------------------------------------------------------------------------------------- training runs


def pretrain_args(data: Path, out: Path, img: int, steps: int, batch: int, *sets: str) -> list[str]:
    args = ["pretrain", str(data), "--out", str(out), "--method", "mae", "--model", "vit_tiny_patch16_224",
            "--img-size", str(img), "--patch-size", "8", "--depth", "2", "--steps", str(steps), "--batch-size",
            str(batch), "--device", "cpu", "-q"]  # fmt: skip
    sets = ("pretrain.mae.decoder_dim=64", "pretrain.mae.decoder_heads=4", "pretrain.mae.decoder_depth=1",
            "pretrain.mae.reconstruct_images=0", "pretrain.log_every=10", "pretrain.checkpoint_every=100000",
            *sets)  # fmt: skip
    return args + [a for s in sets for a in ("--set", s)]


def _tree(root: int) -> list[int]:
    """``root`` and its descendants (from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    parents[int(entry.name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = [root], [root]
    while frontier:
        frontier = [p for p, pp in parents.items() if pp in frontier]
        tree += frontier
    return tree


def _memory(pids: list[int]) -> tuple[int, int]:
    """Summed (PSS, RSS) in bytes of ``pids`` (smaps_rollup)."""
    pss = rss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return pss, rss


def run_fewshot(args: list[str], processes: int, env: dict[str, str], watch: Path | None = None) -> dict[str, float]:
    """Run the command (under torchrun when ``processes`` > 1); peak summed PSS/RSS of its process tree, wall time,
    and the seconds until ``watch`` (metrics.jsonl) has its first line."""
    launcher = [sys.executable, "-m"]
    if processes > 1:
        launcher += ["torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m"]
    start = time.perf_counter()
    proc = subprocess.Popen([*launcher, "fewshot", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    peak = {"pss": 0.0, "rss": 0.0, "first_step_s": float("nan")}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            pss, rss = _memory(_tree(proc.pid))
            peak["pss"], peak["rss"] = max(peak["pss"], pss), max(peak["rss"], rss)
            if watch is not None and math.isnan(peak["first_step_s"]) and watch.is_file() and watch.stat().st_size:
                peak["first_step_s"] = time.perf_counter() - start
            done.wait(0.1 if watch is not None else 0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"fewshot failed ({proc.returncode}):\n{output[-3000:]}")
    peak["seconds"] = time.perf_counter() - start
    return peak


def startup_phases(data: Path, img: int, batch: int) -> dict[str, float]:
    """Seconds of each phase of a second run's start, in this process (a fresh interpreter: imports count)."""
    code = f"""
import json, time
t0 = time.perf_counter(); phases = {{}}
def lap(name):
    global t0
    t = time.perf_counter(); phases[name] = t - t0; t0 = t
import torch, timm; lap("import torch and timm")
import fewshot.train as T
from fewshot.config import build_config
from fewshot.image_store import Batches, open_store
from fewshot.inits import resolve_pretrain
from fewshot.sources import open_source
lap("import fewshot")
sets = ["pretrain.mae.decoder_dim=64", "pretrain.mae.decoder_heads=4", "pretrain.mae.decoder_depth=1",
        "pretrain.data.memory_gb=0"]
flags = {{"pretrain.method": "mae", "pretrain.model": "vit_tiny_patch16_224", "pretrain.img_size": {img},
         "pretrain.patch_size": 8, "pretrain.depth": 2, "pretrain.batch_size": {batch}, "pretrain.steps": 10}}
cfg, init = resolve_pretrain(build_config(None, sets, flags).pretrain)  # as pretrain resolves it
images = open_source({str(data)!r}); lap("list and fingerprint the folder")
plan = T._plan(cfg, len(images)); method = T._build(cfg, plan, init); lap("build the model")
store, cached = open_store(images, cfg); assert not cached.built; lap("open the cache")
store = store.place(torch.device("cpu"), 0.0)
images_, sizes = Batches(store, {batch}, slice(None), 0, plan.steps_per_epoch, 10, torch.device("cpu"))(0)
views = method.augment(images_, torch.Generator().manual_seed(0), slice(None), {batch}, sizes)
method(views, 0)["loss"].backward(); lap("first step (batch, augmentation, forward, backward)")
print(json.dumps(phases))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def step_rate(run: Path) -> float:
    """images/s over the logged steps after the first two logs (warm-up), harmonic mean as a total time."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in lines if r["kind"] == "step"][2:]
    return len(rates) / sum(1 / r for r in rates)


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of the generated JPEGs (made if missing)")
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--work", type=Path, default=None, help="cache and run folders (default: a temporary one)")
    parser.add_argument("--img-size", type=int, default=64, help="training crop size; the cache stores 2x this")
    parser.add_argument("--subset", type=int, default=2000, help="images per decoding round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rate-steps", type=int, default=60)
    parser.add_argument("--memory-steps", type=int, default=None, help="default: one epoch")
    parser.add_argument("--generate-only", action="store_true", help="make the JPEG folder and stop")
    parser.add_argument("--startup-only", action="store_true", help="only the start-up phases (cache in --work)")
    args = parser.parse_args()
    if args.generate_only:
        generate(args.data, args.images, processes=2)
        return
    if args.startup_only:
        os.environ["FEWSHOT_CACHE"] = str(args.work / "cache")
        print_startup(startup_phases(args.data, args.img_size, args.batch))
        return
    sys.path.insert(0, str(ROOT))
    from fewshot.sources import open_source

    work = args.work or Path(tempfile.mkdtemp(prefix="data_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FEWSHOT_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip
    os.environ["FEWSHOT_CACHE"] = env["FEWSHOT_CACHE"]
    side = 2 * args.img_size
    results: dict[str, object] = {"images": args.images, "side": side, "cores": len(os.sched_getaffinity(0))}
    print(f"== {args.images} JPEGs in {args.data}; stored resolution {side} px; {results['cores']} cores", flush=True)
    generate(args.data, args.images, processes=2)
    images = open_source(args.data)
    results["jpeg_bytes"] = folder_bytes(args.data)

    print("== decoding throughput (interleaved rounds)", flush=True)
    rates = decode_rounds(images, side, args.subset, args.rounds, work)
    results["decode"] = {k: {m: statistics.median(x) for m, x in v.items()} for k, v in rates.items()}
    results["decode_rounds"] = rates

    print("== building the cache for every image (2 workers, draft mode)", flush=True)
    from fewshot.image_cache import open_cache

    cached = open_cache(images, side, draft=True, workers=2, progress=True)
    results["build_seconds"] = cached.seconds
    results["cache_bytes"] = cached.path.stat().st_size
    results["cache_images"] = len(cached.sizes)
    del cached

    steps = args.memory_steps or args.images // args.batch
    print(f"== peak memory, {steps} steps, memory-mapped: 1 process, then 2 torchrun processes", flush=True)
    memory = {}
    for processes in (1, 2):
        out = work / f"memory-{processes}"
        shutil.rmtree(out, ignore_errors=True)
        peak = run_fewshot(pretrain_args(args.data, out, args.img_size, steps, args.batch, "pretrain.data.memory_gb=0"),
                           processes, env)  # fmt: skip
        memory[processes] = peak
        print(f"  {processes} process(es): peak PSS {peak['pss'] / 2**30:.2f} GiB, RSS {peak['rss'] / 2**30:.2f} GiB, "
              f"{peak['seconds']:.0f} s", flush=True)  # fmt: skip
    results["memory"] = memory

    print(f"== step rate, {args.rate_steps} steps each: in RAM (A) vs memory-mapped (B), A B A B", flush=True)
    rate: dict[str, list[float]] = {"in RAM": [], "memory-mapped": []}
    first: dict[str, list[float]] = {"in RAM": [], "memory-mapped": []}
    for r in range(2):
        for name, sets in (
            ("in RAM", ("pretrain.data.memory_gb=1000",)),
            ("memory-mapped", ("pretrain.data.memory_gb=0",)),
        ):
            out = work / f"rate-{r}-{name.replace(' ', '-')}"
            shutil.rmtree(out, ignore_errors=True)
            peak = run_fewshot(pretrain_args(args.data, out, args.img_size, args.rate_steps, args.batch, *sets,
                                             "pretrain.log_every=1"), 1, env, watch=out / "metrics.jsonl")  # fmt: skip
            rate[name].append(step_rate(out))
            first[name].append(peak["first_step_s"])
            print(f"  {name}: {rate[name][-1]:.0f} images/s; first step {peak['first_step_s']:.1f} s after start",
                  flush=True)  # fmt: skip
    results["step_rate"] = rate
    results["first_step_s"] = first
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import fewshot.train"], env=env, check=True)
    results["import_s"] = time.perf_counter() - start
    results["startup_phases"] = startup_phases(args.data, args.img_size, args.batch)
    (work / "data_scale.json").write_text(json.dumps(results, indent=2) + "\n")
    report(results)
    print_startup(results["startup_phases"])


def print_startup(phases: dict[str, float]) -> None:
    print(
        f"second run's start-up, {sum(phases.values()):.1f} s: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items())
    )


def report(r: dict) -> None:
    gib = 2**30
    d = {k: v["images_per_s"] for k, v in r["decode"].items()}
    print(f"\n## {r['images']} JPEGs (200–1024 px, 9:16–16:9), stored at {r['side']} px, {r['cores']} cores")
    print("\n| decoding into the cache | images/s | CPU ms per image | cores in use |\n|---|---|---|---|")
    for k, v in r["decode"].items():
        print(f"| {k} | {v['images_per_s']:.0f} | {v['cpu_ms_per_image']:.2f} | {v['cores']:.2f} |")
    print(
        f"\n2 workers / 1 worker: {d['2 worker(s), draft on'] / d['1 worker(s), draft on']:.2f}× (draft on), "
        f"{d['2 worker(s), draft off'] / d['1 worker(s), draft off']:.2f}× (draft off); draft on / off: "
        f"{d['1 worker(s), draft on'] / d['1 worker(s), draft off']:.2f}× (1 worker)"
    )
    print(
        f"cache: {r['cache_bytes'] / gib:.2f} GiB for {r['cache_images']} images "
        f"({r['cache_bytes'] / r['cache_images'] / 1024:.0f} KiB each) vs {r['jpeg_bytes'] / gib:.2f} GiB of JPEGs; "
        f"built in {r['build_seconds']:.0f} s ({r['cache_images'] / r['build_seconds']:.0f} images/s)"
    )
    m1, m2 = r["memory"][1], r["memory"][2]
    print(
        f"peak PSS: 1 process {m1['pss'] / gib:.2f} GiB, 2 processes {m2['pss'] / gib:.2f} GiB "
        f"({m2['pss'] / m1['pss']:.2f}×); RSS summed: {m1['rss'] / gib:.2f} vs {m2['rss'] / gib:.2f} GiB"
    )
    ram, mapped = statistics.median(r["step_rate"]["in RAM"]), statistics.median(r["step_rate"]["memory-mapped"])
    print(f"step rate: memory-mapped {mapped:.0f} vs in RAM {ram:.0f} images/s ({mapped / ram:.2f}×)")
    print(
        f"time to first step (cache built): in RAM {statistics.median(r['first_step_s']['in RAM']):.1f} s, "
        f"memory-mapped {statistics.median(r['first_step_s']['memory-mapped']):.1f} s; "
        f"`import fewshot.train` alone {r['import_s']:.1f} s"
    )


if __name__ == "__main__":
    main()

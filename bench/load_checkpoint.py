"""Checkpoint loading: our sharded ``load_model`` vs plain ``safetensors.numpy.load_file``, same run.

    python bench/load_checkpoint.py                           # ~1.05 GB fp32 checkpoint (~3 min on 2 busy cores)
    python bench/load_checkpoint.py --profile                 # + a cProfile breakdown of one load_model call
    python bench/load_checkpoint.py --threads 1               # our loader reading with one thread
    python bench/load_checkpoint.py --hidden_size 2048 --num_layers 24 --dir /tmp/iopo_bench_3gb   # 3.5 GB

What is measured. A random Qwen2 checkpoint is written once with the tiny-model maker (default:
hidden 1024, 12 layers, MLP 2048, 16 heads / 4 KV heads, tied embeddings, fp32: 1.05 GB in 146
tensors) and cached in ``--dir``; a sharded copy of it (``export_hf`` with ``--shard_mb``) is made
beside it. Then every variant runs in a fresh subprocess (so that its peak RSS is its own):

* ``plain``: ``safetensors.numpy.load_file`` of every file (numpy arrays on the host);
* ``ours xN``: ``iopo_jax.models.load_model(dir, mesh)`` on a mesh of N devices (``fsdp=N``; N>1 uses
  N forced CPU devices, ``XLA_FLAGS=--xla_force_host_platform_device_count=N``), then
  ``block_until_ready`` on every parameter. With fsdp=N the embedding and the q/k/v/gate/up weights
  are split on their second (hidden) dimension: those column slices are copied out of a memory map
  of the file, the rest is read with ``preadv``.

The timed region is the load call only (after imports and JAX backend start-up). Throughput is
checkpoint bytes (all .safetensors files) / wall time, in GB/s (1e9). The ratio is throughput ours /
plain (target >= 0.7). Peak RSS delta is ``ru_maxrss`` after the load minus the RSS just before it; for
``plain`` (which copies out of a memory map of the file) it counts the touched pages of the map as
well as the copies, so ~2x the checkpoint is what its single host copy costs; our loader shows
~1x where it reads with ``preadv`` (1 device) and up to ~2x where it copies column slices out of a
map (fsdp=N); the mapped pages are page cache, not held memory; "anon after" is the anonymous (non file-backed) memory still held after
the load, i.e. the loaded arrays themselves. "cpu s" is the user + system CPU time of the loading
process (all its threads) over the same region: on a busy machine it is steadier than wall time.

Page cache. ``warm`` (the reported comparison): every variant runs ``--repeats`` rounds, interleaved
(plain, ours x1, ours x8, plain, ...); round 1 only warms the page cache and is discarded; the median
of the remaining rounds is reported, so all variants read from the page cache. ``cold`` (one round,
unless ``--no_cold``): before each run the files are evicted from this machine's page cache with
``posix_fadvise(DONTNEED)`` (no root needed; a hypervisor may still cache the disk). The 1-minute
load average is printed beside every number: on a shared machine, compare only rows measured together.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_status() -> dict:
    """RssAnon / RssFile / VmRSS of this process in bytes (Linux /proc)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _cpu_seconds() -> float:
    """user + system CPU time of this process (all threads) so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def checkpoint_files(directory: str) -> list[str]:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".safetensors"))


def checkpoint_bytes(directory: str) -> int:
    return sum(os.path.getsize(p) for p in checkpoint_files(directory))


def evict(directory: str) -> None:
    """Drop the checkpoint files from the page cache (best effort, no root needed)."""
    for p in checkpoint_files(directory):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- child side
def child_main(a) -> None:
    """One measurement in this (fresh) process; prints one ``RESULT {json}`` line."""
    directory = a.child_dir
    if a.child == "plain":
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors.numpy needs for BF16)
        import safetensors.numpy as stn

        rss0, m0 = _rss_status(), _maxrss_bytes()
        t0, c0 = time.perf_counter(), _cpu_seconds()
        out = {}
        for p in checkpoint_files(directory):
            out.update(stn.load_file(p))
        dt, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        n_tensors = len(out)
    else:
        sys.path.insert(0, REPO)
        import jax
        from flax import nnx

        from iopo_jax.models.weights import load_model
        from iopo_jax.sharding import make_mesh

        n = a.child_devices
        devices = jax.devices()[:n]
        if len(devices) < n:
            raise SystemExit(f"asked for {n} devices, JAX sees {len(jax.devices())}")
        mesh = make_mesh({"fsdp": n}, devices)
        prof = None
        if a.child_profile:
            import cProfile

            prof = cProfile.Profile()
        rss0, m0 = _rss_status(), _maxrss_bytes()
        t0, c0 = time.perf_counter(), _cpu_seconds()
        if prof:
            prof.enable()
        threads = 1 if prof else (a.threads or None)
        model, _ = load_model(directory, mesh=mesh, param_dtype=a.param_dtype or a.dtype, threads=threads)
        leaves = jax.tree_util.tree_leaves(nnx.state(model))
        jax.block_until_ready(leaves)
        if prof:
            prof.disable()
        dt, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        n_tensors = len(leaves)
        if prof:
            _print_profile(prof, dt)
    rss1, m1 = _rss_status(), _maxrss_bytes()
    res = {"seconds": dt, "cpu_seconds": cpu, "bytes": checkpoint_bytes(directory), "tensors": n_tensors,
           "peak_rss_delta": m1 - rss0.get("VmRSS", m0), "anon_after_delta": rss1.get("RssAnon", 0) - rss0.get("RssAnon", 0),
           "file_after_delta": rss1.get("RssFile", 0) - rss0.get("RssFile", 0), "load1": os.getloadavg()[0]}
    print("RESULT " + json.dumps(res), flush=True)


def _print_profile(prof, total: float) -> None:
    """cProfile top functions plus a breakdown into copy / abstract model / device put / rest."""
    import io
    import pstats

    s = io.StringIO()
    st = pstats.Stats(prof, stream=s)
    st.sort_stats("tottime").print_stats(15)
    raw = st.stats  # {(file, line, name): (cc, nc, tt, ct, callers)}

    def find(pred, field):
        return sum(v[field] for k, v in raw.items() if pred(k))

    def own(pred):
        return find(pred, 2)

    def cum(pred):
        return max((v[3] for k, v in raw.items() if pred(k)), default=0.0)

    alloc = own(lambda k: k[2] == "aligned_empty")
    pread = own(lambda k: k[2] == "<built-in method posix.preadv>")
    scatter = own(lambda k: k[2] == "read" and k[0].endswith("safetensors_io.py"))
    abstract = cum(lambda k: k[2] == "abstract_model")
    place = cum(lambda k: k[2] == "place_shards")
    header = find(lambda k: k[2] == "__init__" and k[0].endswith("weights.py"), 3)
    rows = [("allocating host buffers (page faults, zeroing)", alloc),
            ("positioned reads (preadv: page cache -> buffers)", pread),
            ("column slices / casts copied from the file's map", scatter),
            ("abstract model (shapes only)", abstract),
            ("device placement (place_shards)", place),
            ("safetensors header parsing (Checkpoint open)", header)]
    print("PROFILE (one load_model call, 1 device, cProfile on, read threads 1):")
    print(f"  total                                             {total:7.3f} s")
    for label, v in rows:
        print(f"  {label:48s}  {v:7.3f} s  ({100 * v / total:.0f}%)")
    print("  top functions by own time:")
    print("\n".join("    " + line for line in s.getvalue().splitlines() if line.strip()), flush=True)


# ----------------------------------------------------------------------------- parent side
def _run_child(args: list[str], env_extra: dict | None = None, echo: bool = False) -> dict:
    env = dict(os.environ)
    env.update(env_extra or {})
    env.setdefault("PYTHONPATH", REPO)
    p = subprocess.run([sys.executable, os.path.abspath(__file__)] + args, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
        raise SystemExit(f"child {' '.join(args)} failed with exit code {p.returncode}")
    res = None
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
        elif echo:
            print(line)
    if res is None:
        raise SystemExit(f"child {' '.join(args)} printed no RESULT line:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return res


def ensure_checkpoints(a) -> dict[str, str]:
    """{'single': dir, 'sharded': dir} (sharded only when --shard_mb > 0); made once, then cached."""
    sizes = dict(hidden_size=a.hidden_size, num_layers=a.num_layers, intermediate_size=a.intermediate_size,
                 num_heads=a.num_heads, num_kv_heads=a.num_kv_heads)
    tag = json.dumps({**sizes, "tie": a.tie_word_embeddings, "dtype": a.dtype}, sort_keys=True)
    single = os.path.join(a.dir, "single")
    stamp = os.path.join(a.dir, "made_with.json")
    fresh = not (os.path.isfile(stamp) and open(stamp).read() == tag and os.path.isfile(os.path.join(single, "model.safetensors")))
    if fresh:
        import shutil

        shutil.rmtree(a.dir, ignore_errors=True)
        os.makedirs(a.dir)
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "iopo_jax.tools.make_tiny_model", "--out", single, "--dtype", a.dtype,
               "--tie_word_embeddings", "true" if a.tie_word_embeddings else "false"]
        for k, v in sizes.items():
            cmd += [f"--{k}", str(v)]
        subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
        print(f"made {single} in {time.perf_counter() - t:.0f} s")
    dirs = {"single": single}
    if a.shard_mb > 0:
        sharded = os.path.join(a.dir, f"sharded_{a.shard_mb}mb")
        if fresh or not os.path.isfile(os.path.join(sharded, "model.safetensors.index.json")):
            t = time.perf_counter()
            _run_child(["--child", "make_sharded", "--child_dir", single, "--child_out", sharded,
                        "--shard_mb", str(a.shard_mb), "--dtype", a.dtype])
            print(f"made {sharded} in {time.perf_counter() - t:.0f} s")
        dirs["sharded"] = sharded
    if fresh:
        with open(stamp, "w") as f:
            f.write(tag)
    return dirs


def make_sharded(a) -> None:
    sys.path.insert(0, REPO)
    from iopo_jax.models.weights import export_hf, load_model

    model, cfg = load_model(a.child_dir, param_dtype=a.dtype)
    export_hf(model, a.child_out, max_shard_bytes=a.shard_mb << 20)
    print("RESULT " + json.dumps({"files": len(checkpoint_files(a.child_out))}))


def variants(a) -> list[tuple[str, list[str], dict]]:
    out = [("plain", ["--child", "plain"], {})]
    for n in a.devices:
        env = {}
        if n > 1:
            env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}
        out.append((f"ours x{n}", ["--child", "ours", "--child_devices", str(n), "--threads", str(a.threads)], env))
    return out


def fmt_gb(b: float) -> str:
    return f"{b / 1e9:.2f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python bench/load_checkpoint.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/iopo_bench_1gb",
                   help="where the benchmark checkpoints are made once and cached (remade when the size flags change)"
                        " (default: %(default)s)")
    p.add_argument("--hidden_size", type=int, default=1024, help="model width of the random checkpoint (default: %(default)s)")
    p.add_argument("--num_layers", type=int, default=12, help="decoder layers (default: %(default)s)")
    p.add_argument("--intermediate_size", type=int, default=2048, help="MLP width (default: %(default)s)")
    p.add_argument("--num_heads", type=int, default=16, help="query heads (default: %(default)s)")
    p.add_argument("--num_kv_heads", type=int, default=4, help="key/value heads (default: %(default)s)")
    p.add_argument("--tie_word_embeddings", action=argparse.BooleanOptionalAction, default=True,
                   help="share embedding and output head (default: tied; --no-tie_word_embeddings adds a second "
                        "151,936 x hidden tensor: 1.67 GB at the default sizes)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the saved weights (default: %(default)s)")
    p.add_argument("--param_dtype", default=None, choices=["float32", "bfloat16"],
                   help="dtype our loader gives the parameters (default: --dtype; e.g. a bfloat16 checkpoint loaded "
                        "into float32 parameters for training casts while reading)")
    p.add_argument("--shard_mb", type=int, default=256,
                   help="also measure a sharded copy (index + files of at most this many MiB; a bigger tensor gets a "
                        "file of its own); 0: only the single-file checkpoint (default: %(default)s)")
    p.add_argument("--devices", default="1,8",
                   help="comma-separated mesh sizes for our loader (fsdp=N); N>1 runs on N forced CPU devices "
                        "(default: %(default)s)")
    p.add_argument("--repeats", type=int, default=4,
                   help="warm rounds per variant; the first only warms the page cache and is discarded, the median "
                        "of the rest is reported (>= 2) (default: %(default)s)")
    p.add_argument("--no_cold", action="store_true",
                   help="skip the cold-cache round (files evicted with posix_fadvise before each run)")
    p.add_argument("--profile", action="store_true",
                   help="after the measurements, run one more (warm, 1-device) load_model under cProfile and print "
                        "where the time goes")
    p.add_argument("--threads", type=int, default=0,
                   help="read threads of our loader (load_model(threads=...)); 0: its default, the CPU count up to 8 "
                        "(default: %(default)s)")
    p.add_argument("--json_out", default=None, help="also write all raw measurements to this JSON file")
    # Internal: what a child process does.
    p.add_argument("--child", choices=["plain", "ours", "make_sharded"], help=argparse.SUPPRESS)
    p.add_argument("--child_dir", help=argparse.SUPPRESS)
    p.add_argument("--child_out", help=argparse.SUPPRESS)
    p.add_argument("--child_devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--child_profile", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child == "make_sharded":
        return make_sharded(a)
    if a.child:
        return child_main(a)
    a.devices = [int(x) for x in a.devices.split(",") if x.strip()]
    if a.repeats < 2:
        p.error("--repeats must be >= 2 (the first warm round is discarded)")

    print(f"load average (1, 5, 15 min) at start: {os.getloadavg()}")
    dirs = ensure_checkpoints(a)
    vs = variants(a)
    results: dict = {}  # (layout, variant) -> {"cold": res, "warm": [res, ...]}
    t_all = time.perf_counter()
    vs = [(name, args + ["--dtype", a.dtype] + (["--param_dtype", a.param_dtype] if a.param_dtype else []), env)
          for name, args, env in vs]
    for layout, d in dirs.items():
        for name, args, env in vs:
            results[(layout, name)] = {"cold": None, "warm": []}
        if not a.no_cold:
            for name, args, env in vs:
                evict(d)
                results[(layout, name)]["cold"] = _run_child(args + ["--child_dir", d], env)
        for r in range(a.repeats):
            for name, args, env in vs:
                res = _run_child(args + ["--child_dir", d], env)
                results[(layout, name)]["warm"].append(res)
                print(f"  [{layout:7s}] round {r + 1}/{a.repeats} {name:8s} {res['seconds']:6.3f} s  "
                      f"(cpu {res['cpu_seconds']:5.2f} s)  "
                      f"load1 {res['load1']:.1f}", flush=True)

    print()
    print(f"Checkpoint loading: {checkpoint_bytes(dirs['single']) / 1e9:.3f} GB, {a.dtype} -> params "
          f"{a.param_dtype or a.dtype}, hidden {a.hidden_size}, "
          f"{a.num_layers} layers; warm = median of rounds 2..{a.repeats}; wall {time.perf_counter() - t_all:.0f} s")
    hdr = (f"| {'checkpoint':10s} | {'loader':8s} | {'warm s':>6s} | {'GB/s':>5s} | {'ours/plain':>10s} | {'cpu s':>5s} | "
           f"{'cold s':>6s} | {'cold GB/s':>9s} | {'cold ratio':>10s} | {'peak RSS +GB':>12s} | {'anon after +GB':>14s} | "
           f"{'load1':>5s} |")
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    table = []
    for layout, d in dirs.items():
        nbytes = checkpoint_bytes(d)
        base = results[(layout, "plain")]
        base_w = statistics.median(x["seconds"] for x in base["warm"][1:])
        base_c = base["cold"]["seconds"] if base["cold"] else None
        nfiles = len(checkpoint_files(d))
        for name, _, _ in vs:
            rr = results[(layout, name)]
            warm = rr["warm"][1:]
            w = statistics.median(x["seconds"] for x in warm)
            c = rr["cold"]["seconds"] if rr["cold"] else None
            cpu = statistics.median(x["cpu_seconds"] for x in warm)
            peak = max(x["peak_rss_delta"] for x in warm)
            anon = statistics.median(x["anon_after_delta"] for x in warm)
            load1 = statistics.median(x["load1"] for x in warm)
            row = dict(checkpoint=f"{layout}({nfiles})", loader=name, warm_s=w, warm_gbs=nbytes / w / 1e9,
                       ratio=base_w / w, cpu_s=cpu, cold_s=c, cold_gbs=(nbytes / c / 1e9) if c else None,
                       cold_ratio=(base_c / c) if c else None, peak_rss_delta=peak, anon_after=anon, load1=load1)
            table.append(row)
            cs = lambda v, f: (f % v) if v is not None else "-"
            print(f"| {row['checkpoint']:10s} | {name:8s} | {w:6.2f} | {row['warm_gbs']:5.2f} | "
                  f"{row['ratio']:10.2f} | {cpu:5.2f} | {cs(c, '%6.2f'):>6s} | {cs(row['cold_gbs'], '%9.2f'):>9s} | "
                  f"{cs(row['cold_ratio'], '%10.2f'):>10s} | {fmt_gb(peak):>12s} | {fmt_gb(anon):>14s} | {load1:5.1f} |")
    ours = [r for r in table if r["loader"].startswith("ours")]
    worst = min(r["ratio"] for r in ours)
    print(f"\ntarget: ours/plain >= 0.70 (warm); worst ours/plain = {worst:.2f} -> "
          f"{'MET' if worst >= 0.7 else 'NOT MET'}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"table": table, "raw": {f"{k[0]}|{k[1]}": v for k, v in results.items()},
                       "args": {k: v for k, v in vars(a).items() if not k.startswith("child")}}, f, indent=2)
    if a.profile:
        print()
        _run_child(["--child", "ours", "--child_devices", "1", "--child_dir", dirs["single"], "--child_profile",
                    "--dtype", a.dtype] + (["--param_dtype", a.param_dtype] if a.param_dtype else []),
                   echo=True)


if __name__ == "__main__":
    main()

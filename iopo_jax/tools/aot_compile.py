"""Does it fit? Compile the training steps for a TPU slice on a machine without one.

    pip install "jax[tpu]"      # libtpu: the TPU compiler, usable on a CPU-only machine
    python -m iopo_jax.tools.aot_compile --config=configs/tpu_v4.py --topology=v4-32

The TPU compiler in libtpu can compile for a slice that is not there:
``jax.experimental.topologies.get_topology_desc`` describes its devices, the config's mesh is built over
them, the model and optimizer state are abstract (``jax.ShapeDtypeStruct`` with a ``NamedSharding``,
nothing allocated) and each step is lowered and compiled ahead of time. The compiled executables report
their per-chip memory (``memory_analysis``) and FLOPs (``cost_analysis``); nothing is executed.

Programs compiled:

- offline configs (IOPO, DPO, SFT, ...): the trainer's ``micro_step`` (forward + backward of one
  micro-batch, gradients added to a donated accumulator) at the largest length bucket, and
  ``apply_step`` (clipping + AdamW);
- RL configs (``rl`` section): the learner's ``grad_step`` and ``logps`` (old / reference log-probs) at
  the longest learner row, ``apply_step``, and the sampler's ``prefill`` (longest prompt bucket) and
  ``decode`` (``max_response_tokens`` new tokens).

Per chip, a program needs its arguments + outputs - aliased (donated) buffers + temporaries, plus the
long-lived state that stays in HBM but is not an argument of that program (e.g. the optimizer state
during a micro-step). That total is compared against the chip's HBM times ``--hbm_fraction``; the exit
status is 1 when a program does not fit (2 for usage or configuration errors).

The model architecture comes from ``model.path``'s ``config.json`` when it is a local directory, else
from ``--model_config`` (a ``config.json`` or a directory holding one), else from the Hugging Face cache,
else from a small built-in table of the hub ids the shipped configs use.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time

import numpy as np
from absl import flags

from data_pipeline import cli
from data_pipeline.batching import make_buckets
from data_pipeline.schema import parse_list
from data_pipeline.tokenization import NUM_SEQUENCES

# jax, flax and the iopo_jax modules (which import jax) are imported inside the functions: main() sets
# JAX_PLATFORMS and the libtpu variables first, and they must be set before jax is imported.

GiB = 1 << 30


# ----------------------------------------------------------------------------------------- TPU targets
@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_gib: float  # per chip
    prefix: str  # topology_name prefix libtpu accepts
    chip_config: str  # "megacore": one JAX device per chip (both TensorCores)
    cores_in_name: int  # the N of "v4-N" counts TensorCores (2 per chip) or chips (1)
    dims: int  # torus dimensions


CHIPS = {
    "v4": Chip(32, "v4", "megacore", 2, 3),
    "v5p": Chip(95, "v5p", "megacore", 2, 3),
    "v5e": Chip(16, "v5e", "default", 1, 2),
    "v6e": Chip(32, "v6e", "default", 1, 2),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}
# Chip grids of the usual slice sizes (number of chips -> torus shape).
SHAPES_3D = {1: (1, 1, 1), 2: (1, 1, 2), 4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16),
             4096: (16, 16, 16)}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # as given
    kind: str  # v4 | v5p | v5e | v6e
    topology_name: str  # e.g. v4:2x2x4
    chip_config: str
    num_chips: int
    hbm_bytes: int  # per chip


def parse_topology(text: str, hbm_gib: float | None = None) -> Target:
    """``v4-32`` / ``v5e-8`` / ``v5litepod-16`` / ``v5p-128`` / ``v6e-64`` (slice names) or a raw
    ``v4:2x2x4`` topology name -> :class:`Target`. Raises ValueError naming what is wrong."""
    s = text.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+?)[:](\d+(?:x\d+)+)", s)
    if m:
        kind = ALIASES.get(m.group(1), m.group(1))
        if kind not in CHIPS:
            raise ValueError(f"--topology={text}: unknown TPU generation '{m.group(1)}'; use one of {sorted(CHIPS)}")
        chip = CHIPS[kind]
        grid = tuple(int(x) for x in m.group(2).split("x"))
        if len(grid) != chip.dims:
            raise ValueError(f"--topology={text}: {kind} slices have a {chip.dims}-D chip grid, got {m.group(2)}")
        n = math.prod(grid)
    else:
        m = re.fullmatch(r"([a-z0-9]+?)-(\d+)", s)
        if not m:
            raise ValueError(f"--topology={text}: expected a slice name like v4-32, v5e-8, v5p-128, v6e-16 "
                             "or a topology like v4:2x2x4")
        kind = ALIASES.get(m.group(1), m.group(1))
        if kind not in CHIPS:
            raise ValueError(f"--topology={text}: unknown TPU generation '{m.group(1)}'; use one of "
                             f"{sorted(CHIPS)} (v5litepod = v5e)")
        chip = CHIPS[kind]
        count = int(m.group(2))
        if count % chip.cores_in_name:
            raise ValueError(f"--topology={text}: {kind}-N counts TensorCores ({chip.cores_in_name} per chip); "
                             f"N must be a multiple of {chip.cores_in_name}")
        n = count // chip.cores_in_name
        table = SHAPES_3D if chip.dims == 3 else SHAPES_2D
        if n not in table:
            raise ValueError(f"--topology={text}: no known chip grid for {n} chips; pass the topology "
                             f"itself, e.g. --topology={kind}:{'x'.join(map(str, table[max(k for k in table if k <= n)]))}")
        grid = table[n]
    hbm = chip.hbm_gib if hbm_gib is None else hbm_gib
    return Target(text, kind, f"{chip.prefix}:{'x'.join(map(str, grid))}", chip.chip_config, n, int(hbm * GiB))


def topology_devices(target: Target) -> list:
    """The compile-only devices of ``target`` (libtpu must be installed)."""
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology_name,
                                            chip_config_name=target.chip_config)
    except Exception as e:  # noqa: BLE001 - libtpu raises plain runtime errors
        raise RuntimeError(f"could not describe TPU topology {target.topology_name} ({type(e).__name__}: {e}). "
                           "Is libtpu installed (pip install \"jax[tpu]\")?") from e
    return list(topo.devices)


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


# ----------------------------------------------------------------------------------------- model config
# Architectures of the hub ids the shipped TPU configs name (HF config.json fields), so that the check
# runs offline. Any other model: a local directory, --model_config, or the Hugging Face cache.
_QWEN2_7B = dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                 num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, hidden_act="silu",
                 max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
                 use_sliding_window=False, bos_token_id=151643, eos_token_id=151645)
KNOWN_ARCHITECTURES = {
    "Qwen/Qwen2-7B-Instruct": _QWEN2_7B,
    "Qwen/Qwen2.5-7B-Instruct": _QWEN2_7B,
    "meta-llama/Llama-3.1-8B-Instruct": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, attention_bias=False,
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)),
}


def hf_architecture(path: str, model_config: str = "", tiny: dict | None = None):
    """(HF config dict or path, where it came from) for ``model.path``; ``tiny``: the sizes of the demo
    configs' random model (``model.make_tiny_if_missing``), used when ``path`` does not exist yet."""
    if model_config:
        return model_config, model_config
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return path, os.path.join(path, "config.json")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
        if isinstance(cached, str):
            return cached, cached
    except Exception:  # noqa: BLE001 - no cache, no package, bad repo id: fall through
        pass
    if path in KNOWN_ARCHITECTURES:
        return dict(KNOWN_ARCHITECTURES[path]), f"built-in architecture of {path}"
    if tiny is not None and not os.path.exists(path):
        from iopo_jax.tools.make_tiny_model import tiny_config

        return tiny_config(**tiny).to_hf(), f"tiny random model of make_tiny_model ({tiny})"
    raise FileNotFoundError(
        f"config.model.path={path!r}: no config.json found (not a local directory, not in the Hugging Face "
        f"cache, not one of {sorted(KNOWN_ARCHITECTURES)}); pass --model_config=PATH/config.json")


def model_config(cfg, model_config_path: str = ""):
    from iopo_jax.models.config import ModelConfig
    from iopo_jax.trainer import model_overrides

    m = cfg.model
    tiny = None
    if m.get("make_tiny_if_missing", False):
        tiny = dict(hidden_size=m.tiny_hidden_size, num_layers=m.tiny_num_layers,
                    intermediate_size=2 * m.tiny_hidden_size)
    src, where = hf_architecture(m.path, model_config_path, tiny)
    mcfg = ModelConfig.from_hf(src, **model_overrides(cfg))
    return mcfg, where


# ----------------------------------------------------------------------------------------- abstract state
def with_shardings(shapes, shardings):
    import jax

    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                                  shardings)


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of an abstract tree (the per-device shard of every leaf)."""
    import jax

    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        sharding = getattr(x, "sharding", None)
        shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def batch_abstract(mesh, rows: int, length: int, spec: dict):
    """{name: ShapeDtypeStruct} sharded over (data, fsdp); ``spec``: name -> (dtype, per-row dims, "L" = length)."""
    import jax

    from iopo_jax.sharding import batch_sharding

    out = {}
    for name, (dtype, dims) in spec.items():
        shape = (rows,) + tuple(length if d == "L" else d for d in dims)
        out[name] = jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape), shape))
    return out


def replicated_scalar(mesh, dtype):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    return jax.ShapeDtypeStruct((), dtype, sharding=NamedSharding(mesh, P()))


# ----------------------------------------------------------------------------------------- programs
@dataclasses.dataclass
class Program:
    name: str
    what: str  # shapes, for the table
    compile: object  # () -> compiled executable
    resident: int = 0  # per-chip bytes of long-lived state that is not an argument
    per_step: int = 1  # executions per optimizer step (offline) or per RL iteration (FLOPs per step)


@dataclasses.dataclass
class Result:
    name: str
    what: str
    argument: int
    output: int
    alias: int
    temp: int
    code: int
    resident: int
    flops: float  # per chip, one execution
    per_step: int
    compile_s: float
    note: str = ""  # e.g. the TPU compiler's own out-of-memory message

    @property
    def total(self) -> int:
        return self.argument + self.output - self.alias + self.temp + self.code + self.resident


def _flops(compiled) -> float:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not report
        return float("nan")
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))


def _compile(spec):
    def compile_():
        return spec.lower().compile()

    compile_.lower = spec.lower  # the FLOP count of a scan-free variant needs only the lowering
    return compile_


def _lowered_flops(lowered, num_devices: int) -> float:
    """FLOPs per chip of a lowered (not compiled) program: XLA's cost analysis of its HLO, which is the
    whole (unpartitioned) program, divided by the number of chips. The TPU compile-only client reports
    nothing for a lowering, so the HLO module is analysed by the CPU client (the count does not depend on it;
    custom kernels such as splash attention count 0, as in the compiled analysis)."""
    try:
        ca = lowered.cost_analysis()
        if isinstance(ca, (list, tuple)):
            ca = ca[0] if ca else None
        if ca and "flops" in ca:
            return float(ca["flops"]) / num_devices
        import jax
        from jax._src.lib import xla_client

        module = lowered.compiler_ir("hlo").as_hlo_module()
        ca = xla_client._xla.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
        return float(ca["flops"]) / num_devices
    except Exception:  # noqa: BLE001 - private API moved or no count: the compiled count stays
        return float("nan")


SAMPLER_LOOPS = ("prefill", "decode")  # the sampler's programs: loops over chunks / tokens and the layers


def unrolled_flops(cfg, mcfg, mesh, names) -> dict:
    """{program: FLOPs per chip per call} of the programs ``names`` lowered with ``scan_layers=False``
    (programs whose count is unavailable are left out: their compiled count stays).

    XLA's cost analysis counts a loop body once, so a ``lax.scan`` over the layers reports the FLOPs of one
    layer; the same program with the layers unrolled (only lowered, not compiled: seconds) counts them all.
    Programs without a lowering of their own (the sampler's prefill / decode) are left out."""
    from iopo_jax.sharding import use_mesh

    flat = mcfg.replace(scan_layers=False)
    with use_mesh(mesh):
        programs = rl_programs(cfg, flat, mesh) if "rl" in cfg else offline_programs(cfg, flat, mesh)
        out = {}
        for p in programs:
            lower = getattr(p.compile, "lower", None)
            if p.name in names and lower is not None:
                flops = _lowered_flops(lower(), mesh.size)
                if math.isfinite(flops):
                    out[p.name] = flops
    return out


def offline_lengths(cfg) -> tuple[int, int]:
    """(global rows, tokens) of the largest micro-batch the data pipeline can yield."""
    d = cfg.data
    length = int(make_buckets(d.cutoff_len, d.bucket_step, parse_list(d.buckets, int, name="config.data.buckets"))[-1])
    return d.batch_size * (1 if d.pack else NUM_SEQUENCES[d.kind]), length


def offline_programs(cfg, mcfg, mesh) -> list[Program]:
    """The trainer's real jitted steps (iopo_jax.trainer.make_step_fns) with abstract arguments."""
    from iopo_jax.trainer import abstract_train_specs

    rows, length = offline_lengths(cfg)
    specs = abstract_train_specs(cfg, mesh, model_cfg=mcfg, rows=rows, seq_len=length)
    state_bytes = per_chip_bytes(specs["micro_step"].args[0])  # frozen weights (+ reference weights)
    opt_bytes = per_chip_bytes(specs["apply_step"].args[1])
    shapes = f"{rows} rows x {length} tokens"
    progs = [
        Program("micro_step", shapes, _compile(specs["micro_step"]), resident=opt_bytes,
                per_step=cfg.optimizer.grad_accum),
        Program("apply_step", "clip + AdamW", _compile(specs["apply_step"]), resident=state_bytes, per_step=1),
        Program("eval_step", shapes, _compile(specs["eval_step"]), resident=opt_bytes, per_step=0),
        Program("ref_step", shapes + " (reference log-probs)", _compile(specs["ref_step"]), resident=opt_bytes,
                per_step=0),
    ]
    return progs


def rl_programs(cfg, mcfg, mesh) -> list[Program]:
    """The RL learner's jitted functions (iopo_jax.rl.loop.make_rl_step_fns) and the sampler's prefill and
    decode (iopo_jax.sampling.engine.Engine) with abstract arguments."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from data_pipeline.schema import parse_list
    from iopo_jax.rl.loop import make_rl_step_fns, rl_step_settings, rl_step_specs
    from iopo_jax.sampling.engine import Engine, RowParams
    from iopo_jax.sampling.sampler import pow2_buckets
    from iopo_jax.sharding import use_mesh
    from iopo_jax.trainer import abstract_model_parts, abstract_opt_state, make_optimizer

    r = cfg.rl
    lora = mcfg.lora is not None
    parts, trainable = abstract_model_parts(mcfg, mesh, lora=lora)
    tx = make_optimizer(cfg.optimizer, max(cfg.train.max_steps, 1), trainable)
    opt_state = abstract_opt_state(tx, trainable)
    fns = make_rl_step_fns(parts, tx, **rl_step_settings(cfg))
    full = r.max_prompt_tokens + r.max_response_tokens
    length = int(math.ceil(full / r.length_step) * r.length_step) if r.length_step > 0 else full
    micro_rows = r.micro_batch_size or r.prompts_per_step * r.group_size // r.mini_batches
    specs = rl_step_specs(fns, parts, trainable, opt_state, mesh, micro_rows, length)
    opt_bytes = per_chip_bytes(opt_state)
    state_bytes = per_chip_bytes(specs["grad_step"].args[0])
    n_rollouts = r.prompts_per_step * r.group_size
    fwd_calls = math.ceil(n_rollouts / micro_rows)

    # The sampler as the RL loop builds it: one batch bucket >= sampler_batch_size, prompt buckets up to
    # max_prompt_tokens, one new-token bucket of max_response_tokens, prefill chunks of 512.
    buckets = (list(parse_list(r.prompt_buckets, int, name="config.rl.prompt_buckets"))
               or list(pow2_buckets(min(32, full), full)))
    if max(buckets) < r.max_prompt_tokens:
        buckets.append(r.max_prompt_tokens)
    p = min(b for b in buckets if b >= r.max_prompt_tokens)
    b = max(pow2_buckets(1, r.sampler_batch_size))
    n = r.max_response_tokens
    gd, mstate = nnx.split(parts.merge(trainable, state=parts.state()))
    engine = Engine(gd, mcfg, pad_id=0, prefill_chunk=512)
    mstate = engine.prepare(mstate)  # the sampler's weights: decoder layers stacked once
    ids = batch_abstract(mesh, b, p, {"ids": (jnp.int32, ("L",)), "mask": (jnp.int32, ("L",))})
    rowf = {"temperature": jnp.float32, "top_p": jnp.float32, "top_k": jnp.int32, "max_new": jnp.int32,
            "seed_hi": jnp.uint32, "seed_lo": jnp.uint32, "prompt_index": jnp.uint32, "sample_index": jnp.uint32}
    rowspec = {k: (v, ()) for k, v in rowf.items()}
    rowspec["stop_ids"] = (jnp.int32, ("L",))
    rp = RowParams(**batch_abstract(mesh, b, 4, rowspec))
    decode_state = {}

    def compile_prefill():
        with use_mesh(mesh):
            c = engine.prefill.lower(mstate, ids["ids"], ids["mask"], rp).compile()
            pre = with_shardings(jax.eval_shape(engine._prefill, mstate, ids["ids"], ids["mask"], rp),
                                 c.output_shardings)
            start = engine.start.lower(pre, rp, num_new=n).compile()
            ds = jax.eval_shape(lambda x, y: engine._start(x, y, num_new=n), pre, rp)
            decode_state["ds"] = with_shardings(ds, start.output_shardings)
        return c

    def compile_decode():
        if "ds" not in decode_state:
            compile_prefill()
        with use_mesh(mesh):
            return engine.decode.lower(mstate, decode_state["ds"], rp, replicated_scalar(mesh, jnp.int32)).compile()

    shapes = f"{micro_rows} rows x {length} tokens"
    return [
        Program("grad_step", shapes, _compile(specs["grad_step"]), resident=opt_bytes,
                per_step=r.ppo_epochs * n_rollouts // micro_rows),
        Program("logps", shapes + " (old log-probs)", _compile(specs["logps"]), resident=opt_bytes,
                per_step=fwd_calls),
        Program("ref_logps", shapes + " (reference log-probs)", _compile(specs["ref_logps"]), resident=opt_bytes,
                per_step=fwd_calls),
        Program("apply_step", "clip + AdamW", _compile(specs["apply_step"]), resident=state_bytes,
                per_step=r.ppo_epochs * r.mini_batches),
        Program("prefill", f"{b} rows x {p} prompt tokens", compile_prefill, resident=opt_bytes,
                per_step=math.ceil(n_rollouts / b)),
        Program("decode", f"{b} rows, cache {p}+{n}, {n} new tokens", compile_decode, resident=opt_bytes,
                per_step=math.ceil(n_rollouts / b)),
    ]


DEFAULT_PROGRAMS = ("micro_step", "apply_step", "grad_step", "logps", "prefill", "decode")

# ----------------------------------------------------------------------------------------- report
def fmt_gib(n: int) -> str:
    """GiB with 2 decimals; small sizes in MiB (tiny test models)."""
    return f"{n / GiB:.2f}" if abs(n) >= GiB // 10 or n == 0 else f"{n / (1 << 20):.1f} MiB"


def table(results: list[Result], target: Target, usable: int) -> str:
    head = ("| program | shapes (global) | arguments (GiB) | outputs | aliased | temporaries | other state | "
            "total / chip | fits | TFLOP / chip / call | calls / step | compile s |")
    lines = [head, "|" + "---|" * 12]
    for r in results:
        fits = "yes" if r.total <= usable and not r.note else "**NO**"
        lines.append(f"| {r.name} | {r.what} | {fmt_gib(r.argument)} | {fmt_gib(r.output)} | {fmt_gib(r.alias)} | "
                     f"{fmt_gib(r.temp)} | {fmt_gib(r.resident)} | {fmt_gib(r.total)} | {fits} | "
                     f"{r.flops / 1e12:.4g} | {r.per_step} | {r.compile_s:.0f} |")
    return "\n".join(lines)


def run(cfg, target: Target, *, hbm_fraction: float = 0.95, model_config_path: str = "", only=(),
        out=print) -> tuple[bool, list[Result], dict]:
    """Compile the programs of ``cfg`` named in ``only`` (a list, ``("all",)``, or empty for the default ones)
    for ``target``; returns (all fit, results, summary)."""
    from iopo_jax.sharding import make_mesh, use_mesh

    mcfg, where = model_config(cfg, model_config_path)
    devices = topology_devices(target)
    mesh = make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}, devices)
    out(f"target {target.name}: {target.topology_name} ({target.chip_config}), {len(devices)} devices "
        f"({devices[0].device_kind}), HBM {target.hbm_bytes / GiB:.1f} GiB per chip, usable "
        f"{hbm_fraction:.0%} = {usable_gib(target, hbm_fraction):.2f} GiB")
    out(f"mesh {dict(mesh.shape)}; model {mcfg.model_type} {mcfg.num_params / 1e9:.2f}B params "
        f"({where}), param_dtype {mcfg.param_dtype}, dtype {mcfg.dtype}, remat {mcfg.remat}, "
        f"attention {mcfg.attention_impl}, scan_layers {mcfg.scan_layers}, LoRA {'r=%d' % mcfg.lora.rank if mcfg.lora else 'off'}")
    with use_mesh(mesh):
        programs = rl_programs(cfg, mcfg, mesh) if "rl" in cfg else offline_programs(cfg, mcfg, mesh)
    names = [p.name for p in programs]
    only = parse_list(only, name="--programs")
    if only == ("all",):
        wanted = set(names)
    elif only:
        wanted = set(only)
        unknown = wanted - set(names)
        if unknown:
            raise ValueError(f"--programs: {sorted(unknown)} are not programs of this config; choose from {names}")
    else:
        wanted = set(DEFAULT_PROGRAMS)
    programs = [p for p in programs if p.name in wanted]
    usable = int(target.hbm_bytes * hbm_fraction)
    results = []
    from tqdm.auto import tqdm

    for prog in tqdm(programs, desc="compiling", disable=len(programs) < 2):
        t0 = time.perf_counter()
        try:
            with use_mesh(mesh):
                compiled = prog.compile()
        except Exception as e:  # noqa: BLE001 - the TPU compiler refuses programs that cannot fit
            oom = compiler_oom(str(e))
            if oom is None:
                raise
            dt = time.perf_counter() - t0
            res = Result(prog.name, prog.what, 0, 0, 0, oom, 0, prog.resident, float("nan"), prog.per_step, dt,
                         note=f"the TPU compiler ran out of HBM: {str(e).strip().splitlines()[0][:300]}")
            results.append(res)
            out(f"  {res.name}: does not fit, {res.note}")
            continue
        dt = time.perf_counter() - t0
        ma = compiled.memory_analysis()
        res = Result(prog.name, prog.what, ma.argument_size_in_bytes, ma.output_size_in_bytes,
                     ma.alias_size_in_bytes, ma.temp_size_in_bytes, ma.generated_code_size_in_bytes, prog.resident,
                     _flops(compiled), prog.per_step, dt)
        results.append(res)
        flops = "" if res.name in SAMPLER_LOOPS else f"{res.flops / 1e12:.4g} TFLOP per chip per call, "
        out(f"  {res.name}: {fmt_gib(res.total)} GiB per chip, {flops}compiled in {dt:.0f} s")
    if mcfg.scan_layers and results:  # the compiled count holds one layer of the scan: count them all
        counts = unrolled_flops(cfg, mcfg, mesh, {r.name for r in results})
        for r in results:
            if r.name in counts:
                r.flops = counts[r.name]
        out(f"  FLOPs of {sorted(counts)} from the unrolled lowering, whole program / {mesh.size} chips "
            "(scan_layers: XLA counts a loop body once)")
    loops = [r for r in results if r.name in SAMPLER_LOOPS]
    for r in loops:  # prefill chunks, decode tokens and the layer scan are loops: XLA's count is one pass
        r.flops = float("nan")
    if loops:
        out(f"  FLOPs of {[r.name for r in loops]} not given: their chunk / token / layer loops are counted "
            "once by XLA (about 2 x parameters x tokens)")
    ok = all(r.total <= usable and not r.note for r in results)
    flops_step = sum(r.flops * r.per_step for r in results if math.isfinite(r.flops))
    summary = {"target": target.name, "topology": target.topology_name, "devices": len(devices),
               "hbm_gib": target.hbm_bytes / GiB, "usable_gib": usable / GiB, "mesh": dict(mesh.shape),
               "model": where, "fits": ok, "flops_per_step_per_chip": flops_step,
               "flops_per_step": flops_step * len(devices),
               "programs": [dict(dataclasses.asdict(r), total=r.total) for r in results]}
    return ok, results, summary


def compiler_oom(message: str) -> int | None:
    """Bytes the TPU compiler said a program needs when it refused to compile it for lack of HBM
    (``RESOURCE_EXHAUSTED: Ran out of memory on HBM ... (35.36G) exceeds available HBM (30.75G)``), else None."""
    if "RESOURCE_EXHAUSTED" not in message or "memory" not in message.lower():
        return None
    m = re.search(r"\(([\d.]+)([KMGT])\)\s*exceeds", message)
    if not m:
        return 1 << 62  # unknown but too large
    return int(float(m.group(1)) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2)])


def usable_gib(target: Target, fraction: float) -> float:
    return target.hbm_bytes * fraction / GiB


PROG = "python -m iopo_jax.tools.aot_compile"
DESCRIPTION = """Compile a training config's steps for a TPU slice without a TPU (needs libtpu: pip install
"jax[tpu]") and check that they fit the chips' HBM. Exit status: 0 fits, 1 does not fit, 2 usage /
configuration error.

    python -m iopo_jax.tools.aot_compile --config=configs/tpu_v4.py --topology=v4-32 [--config.FIELD=VALUE ...]"""


def define_flags(fv) -> None:
    from ml_collections import config_flags

    f = flags
    config_flags.DEFINE_config_file("config", None, "config file (python with get_config()), e.g. configs/tpu_v4.py; "
                                    "override its fields with --config.FIELD=VALUE", flag_values=fv)
    f.DEFINE_string("topology", None, "TPU slice: v4-32, v5e-8 (= v5litepod-8), v5p-128, v6e-16, or a topology name "
                    "such as v4:2x2x4 (v4/v5p names count TensorCores, 2 per chip; v5e/v6e names count chips)",
                    flag_values=fv)
    f.DEFINE_float("hbm_gib", None, "override the HBM per chip in GiB (default: v4 32, v5e 16, v5p 95, v6e 32)",
                   flag_values=fv)
    f.DEFINE_float("hbm_fraction", 0.95, "fraction of HBM a program may use (runtime reserve)", flag_values=fv)
    f.DEFINE_string("model_config", "", "HF config.json (or a directory holding one) of the model, when model.path "
                    "is neither a local directory nor in the HF cache nor a built-in hub id", flag_values=fv)
    cli.define_list("programs", [], "comma list of programs to compile, or 'all'. Offline configs: micro_step, "
                    "apply_step, eval_step, ref_step; RL configs: grad_step, logps, ref_logps, apply_step, prefill, "
                    "decode. Default: the ones that set the memory peak (micro_step, apply_step; RL: grad_step, "
                    "logps, apply_step, prefill, decode); eval_step / ref_step / ref_logps have the shapes of "
                    "micro_step / logps without gradients", fv)
    f.DEFINE_multi_string("set", [], "FIELD=VALUE: override a config field, e.g. --set model.remat=none --set "
                          "data.batch_size=32 (repeatable; values parsed as Python literals when possible; the same "
                          "as --config.FIELD=VALUE)", flag_values=fv)
    f.DEFINE_string("json", "", "also write the results to this JSON file", flag_values=fv)
    for name in ("config", "topology"):
        f.mark_flag_as_required(name, flag_values=fv)


def _main(args, positional) -> int:
    if positional:
        raise cli.usage_error(PROG, f"unexpected arguments {positional}")

    # Compile only: never open a TPU here (a second process may hold it), never query GCE metadata.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    if not libtpu_available():
        print("error: libtpu is not installed; install it with: pip install \"jax[tpu]\" (the TPU compiler runs "
              "on a CPU-only machine; JAX_PLATFORMS=cpu keeps CPU jax as it was)", file=sys.stderr)
        return 2
    try:
        target = parse_topology(args.topology, args.hbm_gib)
        if not 0 < args.hbm_fraction <= 1:
            raise ValueError(f"--hbm_fraction={args.hbm_fraction}: must be in (0, 1]")
        cfg = apply_overrides(args.config, args.set)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        ok, results, summary = run(cfg, target, hbm_fraction=args.hbm_fraction, model_config_path=args.model_config,
                                   only=args.programs)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    usable = int(target.hbm_bytes * args.hbm_fraction)
    print()
    print(table(results, target, usable))
    fs = summary["flops_per_step"]
    unit = "RL iteration (calls of the programs compiled)" if "rl" in cfg else "optimizer step"
    print(f"\ncompiled FLOPs per {unit}: {fs / 1e12:.1f} TFLOP over {summary['devices']} chips "
          f"({summary['flops_per_step_per_chip'] / 1e12:.2f} TFLOP per chip)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    if not ok:
        bad = [r for r in results if r.total > usable or r.note]
        for r in bad:
            if r.note:
                print(f"DOES NOT FIT: {r.name}: {r.note}", file=sys.stderr)
            print(f"DOES NOT FIT: {r.name} needs {fmt_gib(r.total)} GiB per chip but a {target.kind} chip has "
                  f"{fmt_gib(usable)} GiB usable ({target.hbm_bytes / GiB:.0f} GiB x {args.hbm_fraction}); "
                  "lower data.batch_size / cutoff_len (rl: micro_batch_size, sampler_batch_size), use "
                  "model.remat=full, or a larger slice", file=sys.stderr)
        return 1
    print(f"fits: every program fits {target.name} ({fmt_gib(usable)} GiB usable per chip)")
    return 0


def load_config(path: str, overrides: list[str]):
    """``get_config()`` of a config file (what ``--config`` loads), with ``FIELD=VALUE`` overrides."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config={path}: no such file")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:  # configs import each other as ``configs.xxx``
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(f"_aot_config_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return apply_overrides(mod.get_config(), overrides)


def apply_overrides(cfg, overrides: list[str]):
    """``cfg`` with ``FIELD=VALUE`` overrides applied (errors name the field); a list field takes a tuple or a
    comma list (:func:`data_pipeline.schema.parse_list`)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item}: expected FIELD=VALUE")
        field, value = item.split("=", 1)
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        node = cfg
        *parents, leaf = field.split(".")
        for name in parents:
            if name not in node:
                raise KeyError(f"--set {item}: config has no field '{field}'")
            node = node[name]
        if leaf not in node:
            raise KeyError(f"--set {item}: config has no field '{field}'")
        if isinstance(node[leaf], float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(node[leaf], tuple):
            value = parse_list(value, name=f"--set {field}")
        node[leaf] = value
    return cfg


main = cli.command(PROG, DESCRIPTION, define_flags, _main)

if __name__ == "__main__":
    cli.run(main)

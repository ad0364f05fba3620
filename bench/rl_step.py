"""Time split of one online-RL iteration (rollout, reward, reference, learner) and rollout vs plain sampling.

Builds the RL trainer of a config (default: the CPU SegPO demo, tiny random Qwen2), runs ``--warmup``
iterations (compilation) and then ``--iterations`` timed ones, and prints the mean seconds and share of
each phase of an iteration:

* rollout: sampling ``P x G`` answers with the JAX sampler (policy = base + LoRA);
* reward: decoding, segmentation and verdicts (rule verifiers in the demo);
* reference: teacher-forced log-probs of the answers under the policy (old log-probs) and the reference;
* learner: advantages and the ``ppo_epochs x mini_batches`` optimizer steps.

Throughputs: rollout tokens/s = generated tokens / rollout time; learner tokens/s = answer tokens x
ppo_epochs / learner time. In the same run, the sampler alone generates the same number of rows and
tokens (same prompt length bucket, EOS ignored) as a baseline: ``rollout_vs_sampler`` is the rollout's
time per generated token over the plain sampler's (the issue asks for at most 3x).

Example::

    python bench/rl_step.py                                    # tiny demo config, CPU
    python bench/rl_step.py --set rl.group_size=16 --set rl.max_response_tokens=32
    python bench/rl_step.py --config configs/segpo_tpu_v4.py --set model.path=/ckpt/Qwen2.5-7B-Instruct \\
        --set rl.reward=python --set rl.reward_fn=my_rewards.py:score --set rl.group_size=8   # GPU/TPU
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time

from absl import flags

from data_pipeline import cli
from peak import git_commit  # bench/peak.py

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("config", "configs/segpo_demo.py", "RL config file (get_config())")
flags.DEFINE_multi_string("set", [], "config override section.field=value (repeatable)")
flags.DEFINE_integer("warmup", 1, "untimed iterations (compilation)")
flags.DEFINE_integer("iterations", 3, "timed iterations")
flags.DEFINE_integer("devices", 1, "devices of the mesh (0 = all)")
flags.DEFINE_string("workdir", "/tmp/iopo_bench_rl_step", "scratch workdir (wiped)")
flags.DEFINE_string("json_out", None, "also write the results to this JSON file")
FLAGS = flags.FLAGS

PHASES = ("rollout", "reward", "reference", "learner")


def _override(cfg, spec: str):
    key, value = spec.split("=", 1)
    *path, field = key.split(".")
    node = cfg
    for p in path:
        node = node[p]
    old = node[field]
    if isinstance(old, bool):
        node[field] = value.lower() in ("1", "true", "yes")
    elif old is None:
        node[field] = value
    else:
        node[field] = type(old)(value)


def _load_config(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("rl_bench_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def main(argv):
    del argv
    import shutil

    import jax
    import numpy as np

    from iopo_jax.rl.loop import RLTrainer
    from iopo_jax.sampling import SamplingParams

    cfg = _load_config(FLAGS.config)
    for s in FLAGS.set:
        _override(cfg, s)
    cfg.train.max_steps = FLAGS.warmup + FLAGS.iterations
    shutil.rmtree(FLAGS.workdir, ignore_errors=True)
    devices = jax.devices()[:FLAGS.devices] if FLAGS.devices else None
    load = os.getloadavg()
    t0 = time.perf_counter()
    tr = RLTrainer(cfg, FLAGS.workdir, devices=devices, progress=False).setup()
    setup_s = time.perf_counter() - t0
    runs = []
    for step in range(cfg.train.max_steps):
        m = tr.iteration(step)
        if step >= FLAGS.warmup:
            runs.append(m)
    mean = {k: float(np.mean([m[k] for m in runs])) for k in runs[0] if isinstance(runs[0][k], (int, float))}
    total = mean["time/iteration_s"]

    # baseline: the sampler alone, same rows / prompt bucket / new tokens, every row to the end
    r = cfg.rl
    rows = r.prompts_per_step * r.group_size
    plen = int(np.mean([len(x) for x in tr.prompt_ids]))
    new = r.max_response_tokens
    prompts = [list(np.random.RandomState(i).randint(0, 150000, plen)) for i in range(r.prompts_per_step)]
    params = SamplingParams(temperature=r.temperature, max_new_tokens=new, ignore_eos=True, n=r.group_size, seed=0)
    tr.sampler.update_model(tr.parts.merge(tr.trainable))  # the learner donated the previous weights
    tr.sampler.generate(prompts, params)  # compile
    best = None
    for _ in range(max(1, FLAGS.iterations)):
        t = time.perf_counter()
        tr.sampler.generate(prompts, params)
        best = min(best or 1e9, time.perf_counter() - t)
    base_tok_s = rows * new / best
    rollout_tok_s = mean["throughput/rollout_tokens_per_s"]

    res = {
        "config": FLAGS.config, "overrides": FLAGS.set, "objective": cfg.objective.name,
        "rows": rows, "prompts_per_step": r.prompts_per_step, "group_size": r.group_size,
        "max_response_tokens": new, "mean_prompt_tokens": plen,
        "mean_response_tokens": mean["rollout/response_len"],
        "iteration_s": total, "setup_s": setup_s,
        **{f"{p}_s": mean[f"time/{p}_s"] for p in PHASES},
        **{f"{p}_share": mean[f"time/{p}_s"] / total for p in PHASES},
        "rollout_tokens_per_s": rollout_tok_s, "learner_tokens_per_s": mean["throughput/learner_tokens_per_s"],
        "sampler_alone_tokens_per_s": base_tok_s, "rollout_vs_sampler": base_tok_s / max(rollout_tok_s, 1e-9),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"jax {jax.__version__} {jax.devices()[0].platform} x{len(devices or jax.devices())}",
        "load_avg_1m_before": load[0], "load_avg_1m_after": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M"), "commit": (git_commit() or "?"),
    }
    print(f"RL iteration ({cfg.objective.name}, {rows} rollouts = {r.prompts_per_step} prompts x {r.group_size}, "
          f"<= {new} new tokens, mean {res['mean_response_tokens']:.1f}; prompt ~{plen} tokens), "
          f"mean of {len(runs)} after {FLAGS.warmup} warm-up:")
    for p in PHASES:
        print(f"  {p:<10} {res[p + '_s']:8.3f} s  {100 * res[p + '_share']:5.1f} %")
    print(f"  {'total':<10} {total:8.3f} s")
    print(f"  rollout {rollout_tok_s:.1f} tokens/s; sampler alone (same shapes) {base_tok_s:.1f} tokens/s; "
          f"time per token rollout / sampler alone = {res['rollout_vs_sampler']:.2f}")
    print(f"  learner {res['learner_tokens_per_s']:.1f} tokens/s")
    print(f"  {res['machine']}; load average {load[0]:.2f} -> {res['load_avg_1m_after']:.2f}; "
          f"{res['date']}; commit {res['commit']}")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    cli.run_app(main)

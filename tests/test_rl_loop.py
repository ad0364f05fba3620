"""The RL loop on a tiny model: the sign of a SegPO update per segment, a short SegPO run with the fake
judge as reward model (faults, an outage, resume), and (slow) the SegPO / GRPO CPU demos."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs.rl_base import get_config as rl_base_config
from iopo_jax.rl.loop import RLTrainer, read_history
from iopo_jax.rl.rewards import RolloutVerdicts, compute_rewards
from iopo_jax.rl.rollouts import pack_rollouts, segment_rollouts
from tests.fake_judge import FakeJudge

from conftest import REPO

TWO_SUBS = {
    "id": "t-1", "lang": "en", "category": "segpo",
    "prompt": "Answer each part.\n\nSUB_INSTRUCTION_1: Name three colours.\nConstraints:\n1. Use at most 5 words.\n\n"
              "SUB_INSTRUCTION_2: Count to three.\nConstraints:\n1. Use at most 5 words.\n",
    "constraints": [], "constraints_text": [], "constraints_num": 2,
    "sub_instructions": [
        {"key": "SUB_INSTRUCTION_1", "instruction": "Name three colours.", "constraints": [{"type": "word_count", "max": 5}],
         "constraints_text": ["Use at most 5 words."]},
        {"key": "SUB_INSTRUCTION_2", "instruction": "Count to three.", "constraints": [{"type": "word_count", "max": 5}],
         "constraints_text": ["Use at most 5 words."]}],
}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("rl_prompts") / "prompts.jsonl"
    recs = [dict(TWO_SUBS, id=f"t-{i}", prompt=TWO_SUBS["prompt"] + f"(variant {i})\n") for i in range(3)]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(p)


def rl_config(model_dir, prompts_file, **kw):
    c = rl_base_config()
    c.model.path = model_dir
    c.model.dtype = "float32"
    c.rl.prompts_files = (prompts_file,)
    c.rl.prompts_per_step = 1
    c.rl.group_size = 2
    c.rl.max_prompt_tokens = 128
    c.rl.max_response_tokens = 24
    c.rl.prompt_buckets = (128,)
    c.rl.length_step = 0
    c.rl.sampler_batch_size = 8
    c.optimizer.lr = 1e-3
    c.train.max_steps = 2
    c.train.logprob_chunk = 16
    c.train.plot = False
    c.train.tensorboard = False
    c.checkpoint.async_save = False
    c.checkpoint.every = 1
    c.export.peft = False
    for k, v in kw.items():
        node = c
        *path, field = k.split("__")
        for s in path:
            node = node[s]
        node[field] = v
    return c


def test_segpo_update_raises_positive_segments_lowers_negative(tiny_model_dir, prompts_file, tmp_path):
    """Equal r_o (A_o = 0), opposite segment verdicts: one update must raise log p of the tokens of the
    segments with A_phi > 0 and lower it for A_phi < 0; GRPO on the same data has nothing to push."""
    cfg = rl_config(tiny_model_dir, prompts_file, rl__kl_coef=0.0, rl__temperature=1.0)
    tr = RLTrainer(cfg, str(tmp_path / "run"), devices=jax.devices()[:1], progress=False).setup()
    p, pids, tok = tr.prompts[0], tr.prompt_ids[0], tr.tokenizer
    texts = ["SUB_INSTRUCTION_1:\nred green blue\n\nSUB_INSTRUCTION_2:\none two three",
             "SUB_INSTRUCTION_1:\ncyan magenta yellow\n\nSUB_INSTRUCTION_2:\nuno dos tres"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    resp = [tok(t, add_special_tokens=False)["input_ids"] + [end] for t in texts]
    seg = segment_rollouts(tok, resp, [p.expected_ids] * 2, tr.num_slots)
    assert seg.texts == texts and seg.format_ok.tolist() == [1, 1]
    verdicts = [RolloutVerdicts([[True], [False]]), RolloutVerdicts([[False], [True]])]
    rew = compute_rewards([p, p], verdicts, seg.format_ok, num_slots=tr.num_slots, num_constraints=tr.num_constraints)
    assert rew["r_o"][0] == rew["r_o"][1]  # ILA 0.5 + CLA 0.5 + 0 + format 1: no output-level signal
    packed = pack_rollouts([pids, pids], resp, 128, pad_id=tr.sampler.pad_id)
    mask = packed["response_mask"]
    old = tr._forward_all(tr.logp_fn, packed)
    ref = tr._forward_all(tr.ref_fn, packed)
    np.testing.assert_allclose(old, ref, atol=1e-6)  # LoRA B = 0: the policy is the reference
    adv = tr._advantages(rew, seg, packed, mask, 1, 2)
    pos, neg = mask & (adv > 0), mask & (adv < 0)
    # rollout 0: segment 1 up, segment 2 down; rollout 1 the opposite; <|im_end|> (outside) gets 0
    start = packed["response_start"]
    tseg = [np.asarray(s) for s in seg.token_segment]
    for i, (up, down) in enumerate(((0, 1), (1, 0))):
        cols = start[i] + np.arange(len(resp[i]))
        assert (adv[i, cols[tseg[i] == up]] > 0).all() and (adv[i, cols[tseg[i] == down]] < 0).all()
        assert adv[i, cols[-1]] == 0.0
    metrics = tr._learn(packed, mask, old, ref, adv, 0)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # the old log-probs are the policy's
    delta = tr._forward_all(tr.logp_fn, packed) - old
    assert delta[pos].mean() > 0 > delta[neg].mean(), (delta[pos], delta[neg])
    # per segment: the log-prob of each positive segment (sum over its tokens) went up, each negative one down
    for i, (up, down) in enumerate(((0, 1), (1, 0))):
        cols = start[i] + np.arange(len(resp[i]))
        assert delta[i, cols[tseg[i] == up]].sum() > 0 > delta[i, cols[tseg[i] == down]].sum(), (i, delta[i])
    # GRPO: A = A_o = 0 everywhere on this batch
    tr.segpo = False
    assert not tr._advantages(rew, seg, packed, mask, 1, 2).any()


def _judge_reply(body):
    """A deterministic judge whose verdicts vary with the answer (so groups carry a learning signal)."""
    import hashlib

    text = body["messages"][-1]["content"]
    answer = text.split("[Model answer]\n", 1)[1].split("\n\n[Sub-task]", 1)[0]
    h = int(hashlib.sha256(answer.encode()).hexdigest(), 16)
    yes = h % 2 == 0 if "[Sub-task]\nSUB_INSTRUCTION_1:" in text else h % 3 == 0
    return "分析\n" + ("答案：是" if yes else "答案：否")


@pytest.fixture
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for the runs of one test (each run compiles the same programs)."""
    old = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                                               "jax_persistent_cache_min_entry_size_bytes")}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for k, v in old.items():
        jax.config.update(k, v)


@pytest.mark.slow  # > 25 s on 2 cores: runs in .ci/run's second (slow) stage
def test_segpo_with_fake_judge_survives_faults_and_resumes(tiny_model_dir, prompts_file, tmp_path, compile_cache):
    """A short SegPO run with the fake judge as reward model: transient faults are retried and no
    iteration is lost; a judge outage stops a run (on_error=fail), the same command resumes it from its
    checkpoint and ends with exactly the weights of the uninterrupted run."""
    cfg_kw = dict(rl__reward="judge", rl__max_response_tokens=6, train__max_steps=4, rl__temperature=1.0,
                  rl__judge__api_key_env="", rl__judge__model="judge-m", rl__judge__timeout_s=2.0,
                  rl__judge__backoff_base_s=0.01, rl__judge__backoff_max_s=0.05, rl__judge__max_retries=4,
                  rl__judge__on_error="fail")
    one = jax.devices()[:1]

    def run(wd, fj):
        tr = RLTrainer(rl_config(tiny_model_dir, prompts_file, rl__judge__base_url=fj.base_url, **cfg_kw), wd,
                       devices=one, progress=False)
        return tr, tr.run()

    # transient faults on several requests: retried by the client, nothing lost
    wd = str(tmp_path / "run")
    faults = {1: "429", 2: "500", 3: "drop", 4: "garbage", 6: "bad_json", 9: "503"}
    with FakeJudge(reply_fn=_judge_reply, faults=faults, retry_after_s=0.01) as fj:
        tr, res = run(wd, fj)
        n_requests = fj.count()
    assert res["steps"] == 4
    hist = read_history(os.path.join(wd, "metrics.jsonl"))
    assert [s for s, _ in hist] == [1, 2, 3, 4]
    for _, m in hist:
        assert m["rollout/valid_fraction"] == 1.0 and 0 <= m["rollout/cla"] <= 1
        assert m["rollout/sampler_logp_maxdiff"] < 1e-3  # sampler log-probs == teacher-forced ones (T = 1)
    assert hist[-1][1]["judge/retries"] >= 5 and hist[-1][1]["judge/errors"] == 0
    assert min(m["rollout/zero_std_groups"] for _, m in hist) < 1  # some group had a learning signal
    cache = [json.loads(line) for line in open(os.path.join(wd, "judge_cache.jsonl"))]
    assert 0 < len(cache) < n_requests
    final = {k: np.asarray(v) for k, v in tr.trainable.items()}

    # a judge outage (every request fails with HTTP 503 after the 12th) stops the run after its last
    # checkpoint ...
    wd2 = str(tmp_path / "run2")
    with FakeJudge(reply_fn=_judge_reply, faults=lambda number, body: "503" if number > 12 else None) as fj:
        with pytest.raises(RuntimeError, match="rerun the same command to resume"):
            run(wd2, fj)
    done = [s for s, _ in read_history(os.path.join(wd2, "metrics.jsonl"))]
    assert 1 <= len(done) < 4
    # ... and the same command, once the judge is back, resumes: no iteration lost, the same final weights
    with FakeJudge(reply_fn=_judge_reply) as fj:
        tr2, res2 = run(wd2, fj)
    assert res2["steps"] == 4
    assert [s for s, _ in read_history(os.path.join(wd2, "metrics.jsonl"))] == [1, 2, 3, 4]
    for k, v in final.items():
        np.testing.assert_array_equal(np.asarray(tr2.trainable[k]), v, err_msg=k)
    assert any(np.abs(v).max() > 0 for k, v in final.items() if k.endswith("lora_b"))


@pytest.mark.slow
@pytest.mark.heavy  # ~4.5 min on 2 cores; CI runs the SegPO CLI in the 2-process equality test instead
def test_demo_segpo_and_grpo_rewards_rise(tmp_path):
    """configs/segpo_demo.py and configs/grpo_demo.py through the CLI, same budget: the mean rule reward of
    the rollouts rises clearly (first-10 vs last-10 iteration means are printed)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    results = {}
    for name in ("segpo", "grpo"):
        wd = tmp_path / name
        out = subprocess.run([sys.executable, "-m", "iopo_jax.train", f"--config=configs/{name}_demo.py",
                              f"--workdir={wd}", "--noprogress"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        summary = json.loads((wd / "summary.json").read_text())
        first, last = summary["rollout_reward_first10"], summary["rollout_reward_last10"]
        print(f"{name}: mean rollout rule reward, first 10 iterations {first:.3f} -> last 10 iterations {last:.3f}")
        assert "mean rollout reward r_o: first 10 iterations" in out.stdout
        results[name] = (first, last)
        assert last > first + 0.5, (name, first, last)
        hist = read_history(str(wd / "metrics.jsonl"))
        assert len(hist) == 30 and all(m["rollout/segments_found"] == 0 for _, m in hist)
    print("segpo vs grpo (first10 -> last10):", results)
    # The demo prompts have no sub-instructions, so no segment exists and SegPO reduces exactly to GRPO.
    assert results["segpo"] == results["grpo"]

"""Online RL (SegPO, GRPO): the training config of configs/base.py plus an ``rl`` section, every field
documented here.

    python -m iopo_jax.train --config=configs/segpo_demo.py --workdir=/tmp/segpo_demo

One RL *iteration* (``train.max_steps`` counts them): take ``rl.prompts_per_step`` prompts, sample
``rl.group_size`` answers to each from the current policy, score them (``rl.reward``), compute the
advantages (``objective.name``: ``segpo`` = A_o + A_phi, ``grpo`` = A_o) and run ``rl.ppo_epochs`` passes
of ``rl.mini_batches`` optimizer steps over the rollouts with their old log-probs held fixed.

Fields of configs/base.py used as they are: ``model.*`` (LoRA or full fine-tuning; the reference policy is
the base with LoRA off, or the weights as loaded), ``optimizer.*`` except ``grad_accum`` (the schedule
runs over ``iterations * ppo_epochs * mini_batches`` optimizer steps), ``train.seed``, ``train.max_steps``
(iterations; -1 = ``data.num_epochs`` passes over the prompts), ``train.log_every``,
``train.logprob_chunk``, ``train.logprob_remat``, ``train.plot``, ``train.tensorboard``, ``checkpoint.*``
(``every`` counts iterations), ``export.*``, ``mesh.*``, ``distributed``; from ``data``: ``template`` and ``system`` (the chat
prompt), ``seed`` (prompt order) and ``num_epochs``. The other ``data`` and ``objective`` fields are unused.
"""
import ml_collections

from configs.base import get_config as base_config


def get_config():
    c = base_config()
    c.objective.name = "segpo"  # segpo: A = A_o + A_phi (segment advantages per sub-instruction) | grpo: A = A_o
    c.optimizer.lr = 1e-6
    c.optimizer.warmup_ratio = 0.0
    c.optimizer.schedule = "constant"
    c.data.num_epochs = 1

    c.rl = r = ml_collections.ConfigDict()
    # ---------------------------------------------------------------- prompts
    r.prompts_files = ()  # prompt files (demo_eval JSONL or EIFBench JSON), dirs or globs
    r.prompts_kind = "auto"  # auto | demo_eval | eifbench
    r.categories = ()  # keep only records whose `category` is one of these (() = all)
    r.answer_template = ""  # eifbench prompts: answer-prompt template file with {input_text}; "" = our wording
    r.long_prompts = "error"  # prompts longer than max_prompt_tokens: error (naming the record) | skip
    r.prompts_per_step = 4  # P: prompts per iteration
    r.group_size = 8  # G: answers sampled per prompt (the paper's recipe: 16)
    r.max_prompt_tokens = 6144  # longest chat prompt (template included)
    r.max_response_tokens = 2048  # most new tokens per answer (the end-of-turn token included)

    # ---------------------------------------------------------------- sampling (rollouts)
    r.temperature = 1.0  # the policy is softmax(logits / temperature): sampling AND the log-probs of the loss
    r.top_p = 1.0  # nucleus mass of the sampler (1 = off; the loss still uses the full tempered distribution)
    r.top_k = 0  # top-k of the sampler (0 = off)
    r.sampler_batch_size = 64  # rows per sampler device batch
    r.prompt_buckets = ()  # sampler prompt lengths; () = powers of two up to max_prompt_tokens
    r.length_step = 256  # learner rows are padded to a multiple of this (0 = always prompt + response maximum)
    r.check_sampler_logprobs = True  # temperature 1: log max |sampler - teacher-forced| log-prob of the rollouts

    # ---------------------------------------------------------------- rewards
    r.reward = "rules"  # rules (demo_eval constraint specs) | judge (LLM, yes/no per constraint) | python
    r.reward_fn = ""  # python: "package.module:function" or "file.py:function" -> verdicts, a number or a dict
    r.format_reward = "headings"  # headings: 1 iff one SUB_INSTRUCTION_k heading per sub-instruction in order | none
    # r_o = ila*ILA + cla*CLA + all_pass*all_pass + format*r_f (docs/rl.md; all 1): iopo_jax.rl.advantages.RewardWeights
    r.weights = w = ml_collections.ConfigDict()
    w.ila = 1.0
    w.cla = 1.0
    w.all_pass = 1.0
    w.format = 1.0

    r.judge = j = ml_collections.ConfigDict()
    j.base_url = ""  # OpenAI-compatible server, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
    j.model = "gpt-4o"  # judge model name
    j.api_key_env = "OPENAI_API_KEY"  # NAME of the env var holding the key ("" = no key); never logged
    j.temperature = 0.0
    j.top_p = 0.8
    j.max_tokens = 0  # completion cap sent to the judge (0 = not sent)
    j.timeout_s = 120.0  # per request
    j.concurrency = 16  # requests in flight
    j.max_retries = 6  # per request: timeouts, connection errors, 429, 5xx (exponential backoff)
    j.backoff_base_s = 1.0
    j.backoff_max_s = 60.0
    j.max_retry_after_s = 300.0  # cap on a server's Retry-After
    j.request_budget = 0  # max HTTP requests of this run, retries included (0 = no cap)
    j.price_prompt_per_1k = 0.0  # cost per 1,000 prompt tokens (usage report)
    j.price_completion_per_1k = 0.0
    j.store_prompts = False  # also keep the request messages in the reply store
    j.fsync_interval_s = 1.0  # fsync the reply store at most this often
    j.template = ""  # judge prompt file with {input}, {output}, {sub_instruction}, {question}; "" = our wording
    j.system_prompt = "You are a helpful assistant."  # "" = no system message
    j.max_parse_retries = 2  # ask again when a reply has no verdict
    j.on_error = "skip"  # verdict unavailable: skip (rollout left out) | zero (counted as no) | fail (stop)
    j.cache_path = ""  # JSONL reply store (cache, audit); "" = <workdir>/judge_cache.jsonl
    # Every field but template, system_prompt, max_parse_retries, on_error and cache_path is a field of
    # iopo_jax.chat_client.ClientConfig, built with ClientConfig.from_mapping (the two cannot drift apart).

    # ---------------------------------------------------------------- loss and updates
    r.ppo_epochs = 1  # passes over each rollout batch (old log-probs fixed for all of them)
    r.mini_batches = 1  # optimizer steps per pass (must divide P*G)
    r.micro_batch_size = 0  # rows per forward/backward, gradients accumulated (0 = the whole mini-batch)
    r.eps_low = 0.2  # ratio clipped to [1 - eps_low, 1 + eps_high]
    r.eps_high = 0.2
    r.kl_coef = 0.001  # k3 KL penalty to the reference (LoRA off); 0 = none (KL still logged)
    r.aggregation = "token_mean"  # token_mean (every response token of the mini-batch) | seq_mean
    r.adv_eps = 1e-6  # added to the group std
    r.adv_ddof = 1  # std of the group: 1 = sample std | 0 = population std
    return c

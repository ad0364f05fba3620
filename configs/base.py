"""The full set of training config fields, each documented here where it is defined.

Every shipped config starts from :func:`get_config` and changes what it needs. Override any field on
the command line: ``--config.optimizer.lr=1e-5``. A misspelt field name fails (ConfigDict is locked);
a wrong value fails when the run starts, naming the field.

List fields are tuples. On the command line give a Python tuple (``--config.data.buckets="(512, 1024)"``)
or a comma list (``--config.model.lora_targets=q_proj,v_proj``, ``--config.data.train_files=a.json,b.json``):
both mean the same tuple (:func:`data_pipeline.schema.parse_list`). Each section is read through one
dataclass with the same fields and defaults (``data`` -> ``data_pipeline.DataConfig``, ``objective`` ->
``iopo_jax.objectives.ObjectiveConfig``), built by :func:`data_pipeline.schema.from_mapping`.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()

    # ------------------------------------------------------------------ model
    c.model = m = ml_collections.ConfigDict()
    m.path = ""  # HF checkpoint directory (config.json + safetensors) or a hub id (needs network)
    m.make_tiny_if_missing = False  # create a tiny random Qwen2 at `path` when absent (CPU demo, smoke tests)
    m.tiny_hidden_size = 64  # width of that tiny model
    m.tiny_num_layers = 2  # layers of that tiny model
    m.tokenizer = ""  # tokenizer directory; "" = the model directory
    m.param_dtype = "float32"  # storage dtype of parameters (fp32 master weights)
    m.dtype = "bfloat16"  # compute dtype of the matmuls (softmax/norms/log-probs stay fp32)
    m.remat = "none"  # activation checkpointing per layer: none | full | dots | dots_no_batch
    m.attention_impl = "auto"  # auto: splash on TPU, cudnn on GPU, xla (dense) elsewhere | xla | chunked | splash | cudnn
    m.attention_block = 512  # query block of the chunked attention
    m.scan_layers = False  # layers as one lax.scan (faster compile of deep models; same checkpoints/export)
    m.finetune = "lora"  # lora: train adapters only (reference = base, LoRA off) | full: all weights
    m.lora_rank = 8  # LoRA rank r (reference setup: 8)
    m.lora_alpha = 16.0  # LoRA alpha; the update is scaled by alpha / r (reference setup: 16)
    m.lora_dropout = 0.0  # dropout on the LoRA input (reference setup: 0)
    m.lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # or ("all",)

    # ------------------------------------------------------------------ data (see data_pipeline.DataConfig)
    c.data = d = ml_collections.ConfigDict()
    d.kind = "iopo"  # iopo | dpo | sft (file format and sequences per group: 4 | 2 | 1)
    d.train_files = ()  # files, directories, globs or hf:owner/name ids
    d.val_files = ()  # explicit validation files; () = hold out val_fraction / val_count of train
    d.val_fraction = 0.1  # held-out share of the training records (paper: 10%)
    d.val_count = 0  # or an exact number of held-out records (then set val_fraction to 0)
    d.skip_invalid = False  # skip malformed records (counted in the summary) instead of stopping
    d.template = "qwen"  # chat template: qwen | llama3
    d.system = ml_collections.config_dict.placeholder(str)  # system prompt; None = template default
    d.cutoff_len = 6000  # joint truncation length of a group (docs/truncation.md)
    d.batch_size = 8  # groups per micro-batch over all hosts
    d.eval_batch_size = ml_collections.config_dict.placeholder(int)  # None = batch_size
    d.seed = 0  # shuffling and split seed
    d.num_epochs = 3  # passes over the training set (paper: 3)
    d.bucket_step = 128  # length buckets are multiples of this up to cutoff_len
    d.buckets = ()  # or explicit bucket lengths, e.g. (512, 1024)
    d.drop_last = True  # training leaves out the last partial batch of each epoch
    d.pack = False  # SFT only: pack conversations into full rows with segment ids
    d.share_prompt = False  # IOPO/DPO: each prompt once with both answers in a row [x | y_a | y_b] (fewer tokens)
    d.cache_dir = ""  # tokenisation cache; "" = <workdir>/data_cache
    d.num_proc = 1  # processes for tokenisation

    # ------------------------------------------------------------------ objective
    c.objective = o = ml_collections.ConfigDict()
    o.name = "iopo"  # sft | dpo | iopo | iopo_star | iopo_no_input | iopo_no_output | orpo | simpo
    o.beta = 0.1  # implicit-reward temperature (paper: 0.1)
    o.loss_type = "sigmoid"  # sigmoid | robust | exo_pair | hinge | ipo
    o.label_smoothing = 0.0  # eps of sigmoid/robust/exo_pair
    o.pref_ftx = 0.0  # weight of the SFT term added to preference losses
    o.simpo_gamma = 0.5  # SimPO target margin
    o.orpo_lambda = 0.1  # ORPO odds-ratio weight
    o.sft_reduction = "token"  # token | sequence averaging of the SFT loss
    o.reference = "online"  # online: reference forward every step | precompute: once per dataset, cached

    # ------------------------------------------------------------------ optimizer
    c.optimizer = opt = ml_collections.ConfigDict()
    opt.lr = 5e-6  # peak learning rate (paper: 5e-6 DPO/IOPO, 1e-4 SFT)
    opt.schedule = "cosine"  # cosine | linear | constant (after warmup)
    opt.warmup_ratio = 0.1  # share of the steps spent warming up linearly from 0
    opt.weight_decay = 0.0  # AdamW decoupled weight decay
    opt.b1 = 0.9
    opt.b2 = 0.999
    opt.eps = 1e-8
    opt.max_grad_norm = 1.0  # global-norm gradient clipping (0 = off)
    opt.grad_accum = 8  # micro-batches per optimizer step (paper: 8)
    opt.freeze_patterns = ()  # regexes over parameter paths kept frozen (masked updates)

    # ------------------------------------------------------------------ loop
    c.train = t = ml_collections.ConfigDict()
    t.max_steps = -1  # optimizer steps; -1 = num_epochs over the data
    t.eval_every = 500  # evaluate on the validation split every N optimizer steps (and at start/end)
    t.log_every = 1  # write metrics every N steps
    t.seed = 0  # LoRA init and dropout seed
    t.logprob_chunk = 256  # tokens per vocabulary-projection chunk (memory ~ rows * chunk * vocab * 4 B)
    t.logprob_remat = True  # recompute each chunk's logits in the backward pass (False: faster, more memory)
    t.logprob_pack_batch = False  # pack labelled tokens of all rows into one stream (faster on 1 device)
    t.plot = True  # write training_curves.png at the end
    t.tensorboard = True  # write TensorBoard events under <workdir>/tb
    t.compilation_cache_dir = "auto"  # persistent XLA cache: auto (~/.cache/iopo_jax/...) | a path / gs:// | off

    # ------------------------------------------------------------------ checkpoints and exports
    c.checkpoint = ck = ml_collections.ConfigDict()
    ck.every = 500  # save every N optimizer steps (and at the end)
    ck.keep = 3  # checkpoints kept
    ck.async_save = True  # save in the background

    c.export = e = ml_collections.ConfigDict()
    e.peft = True  # write <workdir>/export/adapter (PEFT format) at the end (LoRA runs)
    e.merged = False  # write <workdir>/export/merged (HF checkpoint with LoRA merged in)
    e.dtype = "bfloat16"  # dtype of the merged export

    # ------------------------------------------------------------------ devices
    c.mesh = ms = ml_collections.ConfigDict()
    ms.data = 1  # pure data parallel axis
    ms.fsdp = -1  # data parallel with sharded parameters (-1 = all remaining devices)
    ms.tensor = 1  # tensor parallel axis
    # auto: jax.distributed.initialize() when JAX detects a cluster (TPU pod, SLURM, Open MPI) or a coordinator
    # is given (below or JAX_COORDINATOR_ADDRESS); single process otherwise | on: always | off: never
    c.distributed = "auto"
    c.coordinator_address = ""  # host:port of process 0 (explicit multi-process runs, e.g. GPU hosts)
    c.num_processes = 0  # number of processes (0: detected)
    c.process_id = -1  # this process's index (-1: detected)
    return c

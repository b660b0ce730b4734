"""The one typed configuration shared by every role.

Precedence, highest first: ``EAPO_…`` environment variables (nested with ``__``, e.g.
``EAPO_LEARNER__STEPS=40``; this is how Kubernetes ConfigMaps reach a pod), the YAML file given with
``--config``, then the defaults below. A run directory always holds the fully resolved config.
"""

from __future__ import annotations

import copy
import os
import time
import zlib
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from proto.schemas import AnswerKind


def derive_seed(root: int, role: str) -> int:
    """A role's seed from the root seed: stable across processes and Python versions (``hash()`` is not),
    and different per role, so two roles never draw the same stream."""
    return zlib.crc32(f"{role}:{root}".encode())


class Section(BaseModel):
    model_config = {"extra": "forbid"}


class RedisConfig(Section):
    url: str | None = Field(None, description="redis:// URL; unset means start a private server")
    prefix: str = Field("eapo", description="namespace of every stream and key of this run")
    high_water: int = Field(256, description="unacknowledged trajectory groups before producers wait")
    claim_idle_ms: int = Field(30_000, description="pending entries idle this long are reclaimed")
    max_deliveries: int = Field(5, description="an entry delivered this often is dead-lettered")

    def resolved_url(self) -> str | None:
        """The URL to use if one is given (``REDIS_URL`` beats ``url``); None: ``eapo up`` starts its own."""
        return os.environ.get("REDIS_URL") or self.url


ArithmeticCurriculum = Literal["policy", "policy_partial", "policy_unseen", "solver", "calculator"]
LookupCurriculum = Literal["policy_lookup", "policy_lookup_copy", "solver_lookup", "calculator_lookup"]


class ModelSpec(Section):
    """One tiny-world model: its size, and how long it is trained on which curriculum."""

    curriculum: ArithmeticCurriculum | LookupCurriculum = Field(
        description="policy: the EAPO trace mixture; policy_partial: the same with half its direct "
        "consultations shown result-withheld answers; policy_unseen: policy's mixture without the problems "
        "that need a seeded half of the single-digit facts (only the experts know them); solver: whole problems; "
        "calculator: single operations; *_lookup: the same on the lookup task family, the policy's without the "
        "problems that need a seeded half of the lookup table; policy_lookup_copy: that mixture with every "
        "direct consultation of a `#` problem shown on a random table of their own, the policy writing what it "
        "was shown"
    )
    hidden: int
    layers: int
    sft_steps: int = Field(ge=3)
    lr: float = 3e-3


Tasks = Literal["arithmetic", "lookup"]


class WorldConfig(Section):
    """The bundled tiny world: synthetic arithmetic tasks and tiny CPU models."""

    dir: Path = Field(Path(".cache/world"), description="where the tiny world is built and cached")
    tasks: Tasks = Field(
        "arithmetic",
        description="the task family (eapo.dev.world.tasks): arithmetic, or lookup, which adds a seeded table "
        "operator `#` whose unseen entries sampling cannot guess; its models take the *_lookup curricula",
    )
    seed: int = Field(1234, description="not derived from the run's seed: the world is shared, like a base checkpoint")
    train_problems: int = 2000
    eval_problems: int = 200
    policy: ModelSpec = ModelSpec(curriculum="policy", hidden=64, layers=2, sft_steps=800)
    experts: dict[str, ModelSpec] = Field(
        default_factory=lambda: {
            "expert": ModelSpec(curriculum="solver", hidden=96, layers=4, sft_steps=720, lr=5e-3),
            "calculator": ModelSpec(curriculum="calculator", hidden=96, layers=3, sft_steps=500, lr=5e-3),
        },
        description="expert checkpoints by name: heterogeneous, each good at something else",
    )
    sft_batch: int = 64
    max_positions: int = 384

    @model_validator(mode="after")
    def _curricula_fit_tasks(self) -> WorldConfig:
        specs = {"policy": self.policy, **self.experts}
        lookup = self.tasks == "lookup"
        wrong = [name for name, spec in specs.items() if (spec.curriculum in get_args(LookupCurriculum)) != lookup]
        if wrong:
            raise ValueError(
                f"world.tasks is {self.tasks!r} but the curricula of {', '.join(wrong)} are for "
                f"{'arithmetic' if lookup else 'lookup'} problems: use the *_lookup curricula "
                "exactly when tasks is lookup"
            )
        return self


class ModelConfig(Section):
    """The models of a run: a user's own policy by path, the experts by the name their pools serve."""

    policy: Path | None = Field(
        None,
        description="the policy to train and evaluate: a Hugging Face model directory (config.json, safetensors, "
        "tokenizer.json, a chat template in tokenizer_config.json or chat_template.jinja); unset: the tiny world's",
    )
    experts: list[str] = Field(
        default_factory=lambda: ["expert"],
        min_length=1,
        description="served model names of the expert pools (the gateway routes by name); a consult block's "
        "queries go to them in turn (the query in slot i to pool i mod n), so several pools make a heterogeneous "
        "panel",
    )


class DataSource(Section):
    """One data set: a JSONL or Parquet file and the layout of its records (``eapo.core.data``)."""

    path: Path | None = Field(None, description="JSONL or Parquet file; unset: the tiny world's split")
    layout: Literal["world", "aime", "aimo", "dapo"] = Field(
        "world",
        description="field preset: world (id, problem, answer, tier), aime/aimo (problem, answer), dapo "
        "(prompt as chat messages, reward_model.ground_truth)",
    )
    problem_field: str | None = Field(None, description="override the layout's (dotted path into a record)")
    answer_field: str | None = Field(None, description="override the layout's (dotted path into a record)")
    id_field: str | None = Field(None, description="override the layout's (unset in the layout: file and line)")
    answer_kind: AnswerKind | None = Field(None, description="math (math-verify) or short (exact match and F1)")
    answer_pattern: str | None = Field(None, description="the task's own answer format: a regex, group 1 the answer")


class DataConfig(Section):
    """Training prompts (the learner feeds them) and the evaluation set (``eapo eval``'s default)."""

    train: DataSource = DataSource()
    eval: DataSource = DataSource()


class ExpertServerConfig(Section):
    host: str = "127.0.0.1"
    port: int = 8100
    model: str = Field("expert", description="model name served (the world's model dir name)")
    model_path: Path | None = Field(None, description="checkpoint dir; default: the world's model")
    pool: list[str] = Field(
        default_factory=lambda: ["expert", "calculator"],
        min_length=1,
        description="`eapo up`: world checkpoints served, one server each, under the name `model` "
        "(a heterogeneous pool; name one checkpoint twice for a homogeneous one)",
    )
    max_batch: int = 32
    engine: Literal["cpu", "vllm"] = Field(
        "cpu",
        description="cpu: our batched CPU server; vllm: vLLM's OpenAI server (its CPU build here, CUDA on a GPU)",
    )
    vllm_args: list[str] = Field(
        default_factory=lambda: ["--dtype", "float32", "--enforce-eager"],
        description="engine vllm: more `vllm serve` flags (float32: the tiny world's dtype; eager: starts in "
        "half the time)",
    )
    start_timeout_s: float = Field(
        120.0, gt=0, description="`eapo up`: how long the expert servers and the gateway may take to be healthy"
    )
    answer_cache: int = Field(
        4096,
        ge=0,
        description="the CPU server's greedy completions kept by (prompt ids, max tokens, stops), concurrent "
        "asks sharing one decode; per server, so each expert of a heterogeneous pool keeps its own answers; "
        "cleared when weights load; 0 = off (eapo/core/answer_cache.py; measured in docs/decisions.md)",
    )
    seed: int = Field(
        default_factory=lambda: derive_seed(0, "expert_server"),
        description="the CPU server's sampling when a request names no seed; default: derived from the root `seed`",
    )


class ExpertBackend(Section):
    model: str
    url: str
    weight: float = Field(1.0, gt=0, description="relative capacity (e.g. GPU slots): load is in-flight / weight")
    max_in_flight: int | None = Field(None, ge=1, description="overrides gateway.max_in_flight_per_backend")


class DnsPool(Section):
    """A Kubernetes headless Service: every address its name resolves to is a backend of ``model``."""

    model: str
    host: str = Field(description="e.g. eapo-expert.eapo.svc.cluster.local (a headless Service)")
    port: int = 8000
    scheme: Literal["http", "https"] = "http"
    weight: float = Field(1.0, gt=0)


class DegradeConfig(Section):
    """A robustness setting of the paper's Appendix E, applied by the gateway to one pool's consult answers."""

    mode: Literal["high_error", "content_free", "result_withheld"] = Field(
        description="high_error: the answer's result is made wrong; content_free: a fluent answer with no "
        "information; result_withheld: the answer stops just before it states its result"
    )
    rate: float = Field(1.0, ge=0.0, le=1.0, description="share of answers degraded (a seeded draw per query)")


class GatewayConfig(Section):
    host: str = "127.0.0.1"
    port: int = 8000
    backends: list[ExpertBackend] = Field(default_factory=list)
    discovery: list[DnsPool] = Field(default_factory=list, description="pools whose backends come from DNS")
    discovery_interval_s: float = Field(10.0, gt=0, description="re-resolve the discovery names this often")
    aliases: dict[str, str] = Field(default_factory=dict, description="alias -> served model name")
    policy: Literal["least_outstanding", "power_of_two", "round_robin", "weighted"] = "least_outstanding"
    sticky_episodes: bool = Field(False, description="later requests of an episode go to the same backend")
    sticky_max_imbalance: float = Field(
        4.0, ge=0, description="leave the sticky backend when its load exceeds the least loaded one's by this"
    )
    max_in_flight_per_backend: int | None = Field(None, ge=1, description="requests beyond it wait in the queue")
    queue_size: int = Field(1024, ge=0, description="requests that may wait for a free backend; past it: 429")
    queue_timeout_s: float = Field(10.0, gt=0, description="longest wait in the queue before 429")
    request_timeout_s: float = 60.0
    max_attempts: int = Field(4, ge=1, description="upstream attempts per request (retries on 5xx/connect errors)")
    max_queries: int = Field(8, description="largest batch a consult request may carry")
    answer_cache: int = Field(
        0,
        ge=0,
        description="greedy consult answers kept by (model, query, max_tokens), concurrent asks sharing one "
        "call; only for pools whose weights never change and whose backends answer alike (a heterogeneous pool "
        "under one name would get one backend's answer for all: use expert_server.answer_cache); 0 = off "
        "(eapo/core/answer_cache.py)",
    )
    max_body_bytes: int = Field(1 << 20, ge=1, description="larger request bodies are refused with 413")
    max_tokens_limit: int = Field(8192, ge=1, description="requests asking for more tokens are refused with 422")
    api_token: SecretStr | None = Field(None, description="bearer token required on /v1/* (unset: open)")
    admin_token: SecretStr | None = Field(None, description="bearer token required on /admin/* (unset: open)")
    health_interval_s: float = Field(5.0, gt=0, description="active GET /health on every backend this often")
    unhealthy_after_checks: int = Field(2, ge=1, description="failed health checks in a row that take a backend out")
    eject_after_failures: int = Field(3, ge=1, description="consecutive failed requests that eject a backend")
    eject_s: float = Field(10.0, gt=0, description="how long an ejected backend sits out before health checks")
    shutdown_grace_s: float = Field(30.0, ge=0, description="in-flight requests get this long at shutdown")
    keep_alive_s: float = Field(
        75.0,
        gt=0,
        description="idle client connections are closed after this; longer than clients' own idle "
        "timeouts (httpx 5 s, aiohttp 15 s), so that a client never sends on a connection the gateway is closing",
    )
    degrade: dict[str, DegradeConfig] = Field(
        default_factory=dict,
        description="served model name -> robustness setting (paper Appendix E) applied to its /v1/consult answers",
    )
    seed: int = Field(
        default_factory=lambda: derive_seed(0, "gateway"),
        description="tie-breaks, power-of-two draws and degrade draws; default: derived from the root `seed`",
    )


class RolloutConfig(Section):
    replica: str = Field("rollout-0", description="consumer name in the prompts group")
    group_size: int = Field(4, description="G: episodes per prompt")
    max_groups_in_flight: int = 4
    max_queries: int = Field(3, description="K: queries per consult block")
    gateway_url: str = "http://127.0.0.1:8000"
    max_new_tokens: int = Field(48, description="tokens the policy may sample per turn")
    max_context: int = 320
    expert_max_tokens: int = Field(
        64, description="tokens an expert may answer with (the tiny world's worked solutions run to 54, EOS included)"
    )
    expert_timeout_s: float = 30.0
    temperature: float = 1.0
    top_p: float = 1.0
    max_batch: int = 64
    engine: Literal["transformers", "remote", "vllm"] = Field(
        "transformers",
        description="transformers: the policy in this process (CPU); remote: policy servers (vLLM); "
        "vllm: vLLM's AsyncLLM in this process (GPU, the gpu extra)",
    )
    vllm_args: dict[str, Any] = Field(
        default_factory=dict, description="vllm engine: AsyncEngineArgs fields, e.g. gpu_memory_utilization"
    )
    policy_urls: list[str] = Field(default_factory=list, description="remote engine: every policy server")
    policy_model: str = Field("policy", description="remote engine: the served model name")
    metrics_port: int | None = Field(None, description="serve Prometheus /metrics on this port")
    seed: int = Field(
        default_factory=lambda: derive_seed(0, "rollout"), description="default: derived from the root `seed`"
    )
    consult: bool = Field(True, description="grant the consult action (False: self-exploratory RL)")


class ScheduleConfig(Section):
    """One annealed quantity: ``start`` → ``end`` over ``steps`` after ``hold`` steps."""

    kind: Literal["constant", "linear", "cosine", "exponential", "step"] = "linear"
    start: float
    end: float
    hold: int = 0
    steps: int = 100
    step_every: int = Field(10, description="'step' family: change every this many steps")


class AnnealConfig(Section):
    acceptance: ScheduleConfig = ScheduleConfig(start=1.0, end=0.0, steps=30)
    budget: ScheduleConfig = ScheduleConfig(start=4, end=1, steps=30)
    penalty: ScheduleConfig = ScheduleConfig(start=0.0, end=0.1, steps=30)


class BroadcastConfig(Section):
    """The learner broadcasts each weight version to a fixed pool of policy servers (``proto.broadcast``)
    instead of their loading it from storage; storage still gets every version."""

    servers: list[str] = Field(default_factory=list, description="policy servers (dev mode); empty: off")
    address: str = Field("127.0.0.1:29650", description="host:port the learner's rendezvous listens on")
    backend: Literal["gloo", "nccl"] = Field("nccl", description="nccl between GPUs, gloo on CPU")
    ranks_per_server: int = Field(1, ge=1, description="workers per server (its tensor-parallel size)")
    timeout_s: float = Field(300.0, gt=0, description="a join or a broadcast that takes longer ends the path")


InternalizeSource = Literal["policy", "expert"]


class LearnerConfig(Section):
    steps: int = 20
    batch_groups: int = Field(4, description="informative groups per learner step (one weight version)")
    max_dropped_per_step: int = Field(64, description="zero-signal groups a step may skip")
    dynamic_sampling: bool = Field(
        True,
        description="drop groups whose correctness scores (as rewarded: learner.check_work) are all equal (DAPO, "
        "on accuracy); off keeps them, "
        "their advantages then only the consult penalty's λ·(c − mean c) (plumbing tests on an untrained world)",
    )
    prompt_skip_explore: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="GRESO: skip a problem whose last z groups had no outcome signal with probability "
        "1 − max(explore^z, 0.01), before its rollout; None admits every problem (learner/feeder.py)",
    )
    max_staleness: int = Field(
        2,
        ge=0,
        description="batches the prompt feed may run ahead of the learner; 0 = synchronous (README: Asynchrony)",
    )
    max_version_lag: int | None = Field(
        None, description="hard limit: drop (counted) groups whose oldest turn is this many versions behind"
    )
    dedup_horizon_s: float = Field(
        6 * 3600.0,
        gt=0,
        description="a group whose prompt was admitted longer ago is dropped (counted 'expired'); trained ids "
        "are remembered this long, so the duplicate ledger stays bounded",
    )
    version_report_ttl_s: float = Field(600.0, description="how long a rollout's version report spares it")
    metrics_port: int | None = Field(None, description="serve Prometheus /metrics on this port")
    lr: float = 1e-4
    warmup_steps: int = Field(2, ge=0, description="learner steps of linear lr warm-up (not optimizer updates)")
    clip_low: float = 0.20
    clip_high: float = 0.28
    normalize_advantages: bool = Field(
        True, description="divide the group-centred outcome by the group std (never the consult penalty)"
    )
    importance: Literal["decoupled", "truncated", "none"] = Field(
        "decoupled",
        description="off-policy correction: decoupled PPO (clip around the pre-step policy, weight by "
        "π_prox/π_behaviour, tokens above the cap masked), truncated IS (weight capped), or none "
        "(clip around the behaviour policy)",
    )
    behaviour_weight_cap: float = Field(5.0, gt=1.0)
    kl_coef: float = Field(0.0, ge=0.0, description="KL penalty to the initial policy; 0 = off (as in DAPO)")
    internalize: bool = Field(
        False,
        description="context distillation beyond the paper (learner/distill.py): a right direct consultation's "
        "answer is also trained after the prompt alone, without the expert's answers",
    )
    internalize_weight: float = Field(
        1.0,
        gt=0.0,
        description="the distilled samples' advantage multiplier (learner.internalize): a larger step on what the "
        "experts showed, confined to those rows",
    )
    internalize_prompt: Literal["training", "evaluation"] = Field(
        "training",
        description="the prompt a distilled answer follows (learner.internalize): the episode's own training prompt "
        "(which also credits not consulting under it), or the evaluation prompt the policy is judged alone on",
    )
    internalize_source: InternalizeSource = Field(
        "policy",
        description="whose text is distilled (learner.internalize): the policy's own answer after the expert's, or "
        "the expert's shown answer that agrees with the policy's right final answer",
    )
    check_work: bool = Field(
        False,
        description="beyond the paper: in training a right answer whose own written equations do not all hold "
        "(Trajectory.work_holds) scores 0, so a box copied from an expert below a wrong chain earns nothing; "
        "judging is unchanged",
    )
    overlong_max_tokens: int | None = Field(None, description="DAPO overlong shaping: response limit")
    overlong_buffer: int = Field(64, description="DAPO overlong shaping: soft-penalty window")
    ppo_epochs: int = Field(1, ge=1, description="passes over each batch (PPO epochs; verl's ppo_epochs)")
    mini_batches: int = Field(
        1, ge=1, description="optimizer updates per pass, each on an equal share of the batch's groups (DAPO: 16)"
    )
    micro_batch_tokens: int = Field(8192, description="padded tokens per micro-batch (grad accumulation)")
    zero_stage: int = Field(2, ge=0, le=3)
    grad_clip: float = 1.0
    weights_dir: Path | None = Field(None, description="default: <run_dir>/weights")
    keep_versions: int = 3
    broadcast: BroadcastConfig = Field(default_factory=BroadcastConfig)
    checkpoint_dir: Path | None = Field(None, description="default: <run_dir>/checkpoints")
    keep_checkpoints: int = 2
    seed: int = Field(
        default_factory=lambda: derive_seed(0, "learner"), description="default: derived from the root `seed`"
    )

    @model_validator(mode="after")
    def _mini_batches_split_the_groups(self) -> LearnerConfig:
        if self.batch_groups % self.mini_batches:
            raise ValueError(
                f"learner.mini_batches={self.mini_batches} must divide learner.batch_groups={self.batch_groups}: "
                "each update takes whole groups, an equal share of them"
            )
        return self

    @model_validator(mode="after")
    def _internalize_settings_need_internalize(self) -> LearnerConfig:
        # by value, not by what was set: a resolved config (config.yaml) names every field
        fields = ("internalize_weight", "internalize_prompt", "internalize_source")
        changed = [f"learner.{k}" for k in fields if getattr(self, k) != type(self).model_fields[k].default]
        if changed and not self.internalize:
            raise ValueError(f"{', '.join(changed)} set, but learner.internalize is off: it would do nothing")
        return self


class SupervisionConfig(Section):
    """``eapo up``'s process policy: a process that dies is restarted after a back-off, within a budget;
    processes may be pinned to cores."""

    max_restarts: int = Field(5, ge=0, description="restarts allowed per component before the run stops")
    backoff_s: float = Field(1.0, ge=0, description="wait before the first restart; doubles per crash in a row")
    backoff_max_s: float = Field(30.0, ge=0, description="the back-off's ceiling")
    reset_after_s: float = Field(60.0, ge=0, description="up this long: the next crash backs off from the start")
    cpu_affinity: dict[str, list[int]] = Field(
        default_factory=dict,
        description="pin processes to CPU cores by name prefix (learner, rollout, expert, gateway), e.g. "
        "{learner: [1], rollout: [0]}: each stage on its own cores, as on separate machines; empty: no pinning "
        "(the private Redis is never pinned)",
    )


class TrackingConfig(Section):
    """Optional sinks mirroring every learner step and held-out evaluation; metrics.jsonl stays the record."""

    tensorboard: bool = Field(False, description="write TensorBoard event files under <run_dir>/tensorboard/")
    wandb: bool = Field(False, description="log to Weights & Biases (under <run_dir>/wandb/)")
    wandb_project: str = "eapo"
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="offline needs no network (`wandb sync` uploads later); online needs a login"
    )


class EAPOConfig(BaseSettings):
    """Everything a role needs. Resolved once, written next to the results."""

    model_config = SettingsConfigDict(env_prefix="EAPO_", env_nested_delimiter="__", extra="forbid")

    run_dir: Path = Field(default_factory=lambda: Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    seed: int = Field(0, description="the root seed: every role's seed not set is derived from it")
    log_level: str = "INFO"
    timeline: bool = Field(
        False, description="record who is busy when under <run_dir>/timeline (benchmarks.async_speedup reads it)"
    )
    metrics_host: str = Field("127.0.0.1", description="address of the learner's and rollout's /metrics")
    redis: RedisConfig = RedisConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    world: WorldConfig = Field(WorldConfig(), description="the tiny world `eapo bootstrap` builds (model/data default)")
    expert_server: ExpertServerConfig = ExpertServerConfig()
    gateway: GatewayConfig = GatewayConfig()
    rollout: RolloutConfig = RolloutConfig()
    learner: LearnerConfig = LearnerConfig()
    anneal: AnnealConfig = AnnealConfig()
    supervision: SupervisionConfig = SupervisionConfig()
    tracking: TrackingConfig = TrackingConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file (passed as init kwargs): a ConfigMap can override a baked config.
        return env_settings, init_settings

    @model_validator(mode="after")
    def _check(self) -> EAPOConfig:
        roles = {
            "rollout": self.rollout,
            "learner": self.learner,
            "gateway": self.gateway,
            "expert_server": self.expert_server,
        }
        for role, section in roles.items():
            if "seed" not in section.model_fields_set:  # a section alone is seeded as under root seed 0
                section.seed = derive_seed(self.seed, role)
        if self.rollout.max_queries > self.gateway.max_queries:
            raise ValueError(
                f"rollout.max_queries={self.rollout.max_queries} exceeds gateway.max_queries={self.gateway.max_queries}"
            )
        gw = self.gateway
        served = {b.model for b in gw.backends} | {p.model for p in gw.discovery} | set(gw.aliases)
        if served and (unserved := [m for m in self.model.experts if m not in served]):
            raise ValueError(
                f"model.experts {unserved} name no pool of the gateway (its models: {sorted(served)}); "
                "every consult to them would fail"
            )
        return self

    @property
    def policy_path(self) -> Path:
        """The initial policy: ``model.policy``, else the tiny world's."""
        return self.model.policy or self.world.dir / "policy"

    def data_path(self, split: Literal["train", "eval"]) -> Path:
        """The file of ``data.<split>``, else the tiny world's split."""
        return getattr(self.data, split).path or self.world.dir / f"{split}.jsonl"

    @property
    def uses_world(self) -> bool:
        """Whether a local run (``eapo up``) needs the tiny world built: the default policy or training
        set, or an expert checkpoint named under ``world.dir`` rather than by an absolute path."""
        pool_in_world = any(not Path(c).is_absolute() for c in self.expert_server.pool)
        return self.model.policy is None or self.data.train.path is None or pool_in_world

    @property
    def weights_dir(self) -> Path:
        return self.learner.weights_dir or self.run_dir / "weights"

    @property
    def checkpoint_dir(self) -> Path:
        return self.learner.checkpoint_dir or self.run_dir / "checkpoints"

    def dump_yaml(self, path: Path) -> None:
        """The resolved config; secrets appear masked (tokens as ``**********``, a Redis password as
        ``***``): pass them with ``secret_env``."""
        data = self.model_dump(mode="json")
        if data["redis"]["url"] and urlsplit(data["redis"]["url"]).password:
            parts = urlsplit(data["redis"]["url"])
            data["redis"]["url"] = urlunsplit(
                parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@"))
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False))

    def secret_env(self) -> dict[str, str]:
        """The environment that hands this config's secrets to a child process (never written to disk)."""
        secrets = {
            "EAPO_GATEWAY__API_TOKEN": self.gateway.api_token,
            "EAPO_GATEWAY__ADMIN_TOKEN": self.gateway.admin_token,
        }
        env = {name: value.get_secret_value() for name, value in secrets.items() if value is not None}
        if self.redis.url and urlsplit(self.redis.url).password:
            env["REDIS_URL"] = self.redis.url  # REDIS_URL beats the (masked) file
        return env


# How a policy is judged: alone (the minimal prompt), or in the expert-assisted / self-collaboration workflow.
EvalMode = Literal["alone", "expert-assisted", "self-collaboration"]


class ArmConfig(Section):
    """One arm of an experiment: a way to produce a policy, then how it is judged."""

    train: bool = Field(True, description="train with EAPO's loop (False: judge the world's initial policy)")
    eval_mode: EvalMode = "alone"
    overrides: dict[str, Any] = Field(default_factory=dict, description="merged into the shared `run` config")


KeepWeights = Literal["final", "judged"]


def final_sample_count(eval_samples: int, final_eval_samples: int | None) -> int:
    """Samples per problem for a run's final version; a function of the two values, not of a whole config, so
    the report applies the same rule to an experiment file older than ``ExperimentConfig`` accepts."""
    return final_eval_samples or eval_samples


class ExperimentConfig(Section):
    """``eapo experiment``: arms × seeds on one task suite and learner-step budget."""

    out: Path = Field(Path("runs/experiment"), description="one directory per arm and seed below it")
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    eval_samples: int = Field(4, ge=1, description="N samples per held-out problem (mean@N, variance)")
    final_eval_samples: int | None = Field(
        None,
        ge=1,
        description="samples per held-out problem for the final version alone, which the table and the headline "
        "judge; None: eval_samples. At 4 samples a run's mean carries about 0.008 of sampling error on the tiny "
        "world, as large as the gaps it weighs (docs/experiment.md); the curve's points keep eval_samples",
    )
    eval_every: int = Field(10, ge=1, description="learner steps between held-out evaluations")
    eval_limit: int | None = Field(None, ge=1, description="only the first problems of the held-out split")
    keep_weights: KeepWeights = Field(
        "final",
        description="weight versions a trained run keeps once its curve is judged: the final one, or every one "
        "judged (each eval_every steps, for exact measures of the policy along the curve afterwards)",
    )
    run: dict[str, Any] = Field(default_factory=dict, description="the run config every arm shares")
    arms: dict[str, ArmConfig] = Field(min_length=1)
    compare: tuple[str, str] = Field(("eapo", "self-exploratory-rl"), description="the headline: first minus second")
    world_digest: str | None = Field(
        None,
        description="the shipped world (`run.world.dir`) its records were made on: others refused, none rebuilt",
    )

    @property
    def final_samples(self) -> int:
        return final_sample_count(self.eval_samples, self.final_eval_samples)

    @model_validator(mode="after")
    def _one_world(self) -> ExperimentConfig:
        """Arms pair by seed on one world (set it in ``run``); ``records`` is where the report keeps its records."""
        if "records" in self.arms:
            raise ValueError("an arm may not be named `records`: out/records holds the report's records")
        own_world = [arm for arm, spec in self.arms.items() if "world" in spec.overrides]
        if own_world:
            raise ValueError(f"arm(s) {', '.join(own_world)} override `world`; every arm shares the `run` section's")
        return self

    def arm_config(self, arm: str, seed: int) -> EAPOConfig:
        """The full run config of ``arm`` with ``seed``: shared config, then the arm's overrides."""
        data = merge(merge({}, self.run), self.arms[arm].overrides)
        merge(data, {"seed": seed, "run_dir": str(self.out / arm / f"seed-{seed}")})
        return EAPOConfig(**data)

    def runs(self, arms: list[str] | None = None) -> list[tuple[str, int]]:
        """The (arm, seed) pairs to run: every arm's, or only those of ``arms``."""
        unknown = [a for a in arms or () if a not in self.arms]
        if unknown:
            raise ValueError(f"unknown arm(s) {', '.join(unknown)}; the experiment has {', '.join(self.arms)}")
        return [(arm, seed) for arm in arms or self.arms for seed in self.seeds]


def merge(into: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of nested mappings, ``update`` winning (as ``helm -f a.yaml -f b.yaml``); returns
    ``into``, which never shares a mutable value with ``update``."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


def load_config(path: str | Path | None = None, **overrides: Any) -> EAPOConfig:
    """Read ``path`` (YAML), apply keyword overrides, then environment variables."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = loaded or {}
    data.update(overrides)
    return EAPOConfig(**data)


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read and check an experiment file: every arm × seed must make a valid run config, so a typo
    fails now rather than 40 minutes in, and before ``eapo experiment`` imports torch."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    exp = ExperimentConfig(**data)
    for arm in exp.arms:
        for seed in exp.seeds:
            exp.arm_config(arm, seed)
    return exp

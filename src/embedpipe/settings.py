"""The one settings schema: environment (prefix ``EMBEDPIPE_``), an optional ``.env`` and CLI flags.

Build it once in a composition root (``embedpipe serve``, a test) and pass it down; nothing reads
settings from a module global.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "embedpipe"


class BatchingSettings(BaseModel):
    """How the micro-batcher fills model batches."""

    max_batch_size: int = Field(32, ge=1, le=4096)
    # Padded tokens (batch size x longest text) one model call may hold. Small on purpose:
    # on CPU a call over ~1k tokens runs slower per token (its activations and attention
    # scores outgrow the caches): 1024 gave torch 1.15x and ONNX 1.2x the texts/s of 16384
    # (make bench-backends --budgets). Raise it on a GPU.
    max_batch_tokens: int = Field(1024, ge=256)
    # A batch grows only while padding stays under this share of its padded tokens (beyond a
    # few tokens per text): on CPU a padded token costs as much as a real one.
    max_padding: float = Field(0.1, ge=0.0, lt=1.0)
    max_wait_ms: float = Field(2.0, ge=0.0, le=1000.0)
    # Texts waiting for the model, across all requests; beyond it requests get 503.
    max_queue_texts: int = Field(8192, ge=1)


class CacheSettings(BaseModel):
    """The tiered cache: L1 in process, L2 in Redis or SQLite."""

    enabled: bool = True
    namespace: str = "ep"
    # Each API key gets its own cache namespace, so no tenant learns what another embedded
    # (from the `cached` flag, `cached_count` or the time of a hit), at the price of hit rate:
    # the same text is computed once per key. None (the default) = on when more than one key
    # is configured; false shares one cache across keys, and with it that knowledge.
    per_tenant: bool | None = None
    l1_max_bytes: int = Field(256 * 1024 * 1024, ge=0)
    ttl_seconds: int = Field(30 * 24 * 3600, ge=0)  # 0 = no expiry (Redis only)
    sqlite_max_bytes: int = Field(2 * 1024 * 1024 * 1024, ge=0)  # 0 = unbounded
    redis_socket_timeout: float = Field(0.25, gt=0)
    redis_connect_timeout: float = Field(0.5, gt=0)
    mget_chunk: int = Field(256, ge=1)
    breaker_failures: int = Field(3, ge=1)
    breaker_reset_seconds: float = Field(5.0, gt=0)
    # float16 halves every entry (L1 and L2) at a cosine of ~0.99999 to the float32 vector;
    # answers are then the float16 values, on a miss too. Each format has its own keys.
    store_dtype: Literal["float32", "float16"] = "float32"


class LimitsSettings(BaseModel):
    """Request size limits, answered in the error envelope."""

    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_inputs: int = Field(2048, ge=1)
    max_input_chars: int = Field(1_000_000, ge=1)
    # Characters (and token ids) in all the inputs of one request together, about 250k
    # tokens (OpenAI allows 300k per request). It also bounds the JSON values of a body,
    # checked before it is parsed: parsing holds the GIL (0.3 s for 2M token ids here).
    max_request_chars: int = Field(1_000_000, ge=1)
    # Tokens one input may hold with ``long_text: "mean"`` (all its windows together): the
    # work one input may ask for. Beyond it: 400 on ``input``.
    max_input_tokens_long: int = Field(8192, ge=1)
    # Documents of one rerank request (Cohere allows 1,000).
    max_rerank_documents: int = Field(1000, ge=1)


class ModelOptions(BaseModel):
    """What a served model is told beyond its own sentence-transformers config."""

    model_config = ConfigDict(extra="forbid")

    # Prompt name -> text prepended to every input that names it (through ``prompt_name`` or
    # ``input_type``). Merged over the model's own ``prompts``: these win.
    prompts: dict[str, str] = Field(default_factory=dict)
    # The prompt of a request that names none; None = the model's own default (usually none).
    default_prompt_name: str | None = None
    # ``long_text: "mean"``: tokens per window (prompt and special tokens included; 0 = the
    # model's window) and tokens shared by consecutive windows.
    long_text_window_tokens: int = Field(0, ge=0)
    long_text_overlap_tokens: int = Field(32, ge=0)


class HttpSettings(BaseModel):
    """What one connection may cost the server before the application sees a request."""

    # A request's line and headers must arrive whole within this long of the connection
    # opening (or of the previous answer on it); else 408 and the connection is closed.
    head_timeout_seconds: float = Field(10.0, gt=0, le=300)
    # An idle keep-alive connection is closed after this long.
    keep_alive_timeout_seconds: int = Field(5, ge=1, le=300)
    # The request line and headers together, and the number of headers (431 past it).
    max_header_bytes: int = Field(64 * 1024, ge=4096, le=1024 * 1024)
    max_headers: int = Field(100, ge=16, le=1000)
    # Open connections of this process; past it a new one gets 503 and is closed at once.
    # 0 = three quarters of the open-file limit (ulimit -n).
    max_connections: int = Field(0, ge=0)
    # Open connections from one client address (trusted proxies exempt), so that one client
    # cannot take them all. 0 = a quarter of max_connections.
    max_connections_per_client: int = Field(0, ge=0)


class SecuritySettings(BaseModel):
    """API keys and rate limits beyond the top-level ``api_keys``/``rate_limit_*`` settings."""

    # /metrics needs a key too (/health and /ready never do).
    protect_metrics: bool = False
    # Addresses or networks (comma-separated, e.g. ``10.0.0.0/8,127.0.0.1``) of the proxies
    # whose X-Forwarded-For names the client; from anyone else the header is ignored.
    trusted_proxies: str = ""
    # Host names (comma-separated; a leading dot allows subdomains, * allows any) a request's
    # Host header may name, so a web page cannot reach the server through DNS rebinding.
    # Empty = the localhost names when bound to a loopback address, else any.
    allowed_hosts: str = ""
    # Key names (comma-separated) that see the whole /stats (model paths, every tenant's
    # traffic); other keys see the models and the version only.
    admin_keys: str = ""
    # The limiter's storage (Redis) is down: False lets requests through unlimited, True
    # refuses them with 503.
    fail_closed: bool = False
    redis_socket_timeout: float = Field(0.25, gt=0)
    redis_connect_timeout: float = Field(0.5, gt=0)
    # After a storage failure, decide without it this long before trying it again.
    retry_seconds: float = Field(1.0, gt=0)


class JobsSettings(BaseModel):
    """Batch jobs: the OpenAI Files + Batch API, run in process or on Celery workers."""

    # Requests (lines of a batch file) per chunk: the unit of work, retry and commit.
    chunk_size: int = Field(100, ge=1, le=50_000)
    max_file_bytes: int = Field(200 * 1024 * 1024, ge=1024)
    max_requests_per_batch: int = Field(50_000, ge=1)
    # Validation reads a batch file line by line and stops at the first line past a limit,
    # failing the batch: a line longer than this (bytes, its newline included; the online
    # body limit), or more invalid lines than ``max_invalid_lines``.
    max_line_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_invalid_lines: int = Field(1000, ge=0)
    # A chunk also closes at this many inputs (the texts of its requests together), so one
    # chunk's vectors stay small in memory however many inputs each request holds.
    chunk_max_inputs: int = Field(2048, ge=1)
    # A chunk (or a batch's validation) whose runs died this many times (the process killed,
    # e.g. out of memory) fails its batch instead of being delivered again forever.
    max_crashes: int = Field(3, ge=1)
    # Per API key (all callers together with auth off); past one, uploads or new batches get
    # 429 insufficient_quota. 0 = no quota.
    max_files_per_key: int = Field(10_000, ge=0)
    max_stored_bytes_per_key: int = Field(10 * 1024**3, ge=0)
    max_active_batches_per_key: int = Field(100, ge=0)
    # An uploaded batch input file is deleted this long after its upload unless the upload
    # set ``expires_after`` (OpenAI's default: 30 days); 0 = kept until deleted. Batch output
    # files are kept until deleted unless the batch set ``output_expires_after``.
    file_retention_seconds: int = Field(30 * 24 * 3600, ge=0)
    # Chunks computed at once by the in-process runner (they share the online batcher).
    in_process_concurrency: int = Field(2, ge=1)
    # Redis broker: the lease of a running chunk. Its worker renews it every third of this
    # while it lives; once it lapses (the worker died) any worker or the API re-queues the
    # chunk. A dead worker's chunk runs again within about this long plus a sixth; a slow
    # chunk on a live worker never runs twice. (RabbitMQ re-queues at once by itself.)
    visibility_timeout_seconds: int = Field(30, ge=3)
    queue: str = "embedpipe"
    # `embedpipe worker` serves Prometheus /metrics (job items, chunk durations) on this port
    # at EMBEDPIPE_HOST; 0 = off.
    worker_metrics_port: int = Field(0, ge=0, le=65535)
    # A batch not finished within its completion window (OpenAI's "24h") expires: chunks
    # not yet computed are skipped, their requests go to the error file as batch_expired,
    # finished ones stay in the output. A positive value overrides the window (seconds).
    expire_after_seconds: int = Field(0, ge=0)


class UpstreamSettings(BaseModel):
    """Calls to an OpenAI-compatible upstream API (models with the ``openai`` backend)."""

    # One upstream call holds at most this many inputs and tokens (OpenAI: 2048 and 300k); a
    # bigger client request becomes several calls.
    max_inputs_per_call: int = Field(2048, ge=1, le=2048)
    max_tokens_per_call: int = Field(300_000, ge=1, le=300_000)
    # Longer inputs are refused with 400 before any call (OpenAI rejects them too).
    max_input_tokens: int = Field(8192, ge=1)
    # Calls in flight at once, per upstream model.
    concurrency: int = Field(4, ge=1, le=64)
    # How long queued texts wait for company before a call leaves.
    max_wait_ms: float = Field(5.0, ge=0.0, le=1000.0)
    # Texts waiting for a call slot; beyond it requests get 503.
    max_queue_texts: int = Field(65536, ge=1)
    # One HTTP attempt, and all attempts of a call together (from its oldest text's arrival).
    timeout_seconds: float = Field(30.0, gt=0)
    deadline_seconds: float = Field(60.0, gt=0)
    # Full-jitter exponential backoff between attempts; Retry-After wins when it is longer.
    retry_base_seconds: float = Field(0.25, gt=0)
    retry_max_seconds: float = Field(8.0, gt=0)
    # An upstream 429 whose Retry-After is at most this long is waited out and retried; a
    # longer one answers the client 429 at once, with the upstream's Retry-After.
    max_retry_wait_seconds: float = Field(5.0, ge=0)
    # Consecutive failed attempts (5xx, timeouts, refused connections) that open the breaker,
    # and how long it stays open before one probe call may go.
    breaker_failures: int = Field(5, ge=1)
    breaker_reset_seconds: float = Field(10.0, gt=0)


class Settings(BaseSettings):
    """Everything embedpipe can be told.

    Env: ``EMBEDPIPE_<NAME>``, nested: ``EMBEDPIPE_CACHE__TTL_SECONDS``.
    """

    model_config = SettingsConfigDict(
        env_prefix="EMBEDPIPE_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    log_level: str = "info"
    # json: one JSON object per line (production); text: for a human at a terminal.
    log_format: Literal["json", "text"] = "json"
    # SIGTERM: /ready answers 503 and new work is refused at once; the listener stays open this
    # long (so load balancers notice) before shutdown starts, which then waits at most
    # drain_timeout_seconds for the requests in flight. Orchestrators must allow both
    # (compose's stop_grace_period, Kubernetes' terminationGracePeriodSeconds).
    drain_delay_seconds: float = Field(2.0, ge=0, le=300)
    drain_timeout_seconds: int = Field(30, ge=1, le=3600)
    data_dir: Path = Field(default_factory=_default_data_dir)
    redis_url: str = ""
    broker_url: str = ""
    # The default model: a name of the bundled model, or a sentence-transformers directory.
    model: str = "all-MiniLM-L6-v2"
    # How the default model runs: torch (sentence-transformers), onnx (ONNX Runtime, exported
    # offline from the local weights) or openai (an OpenAI-compatible upstream API).
    backend: Literal["torch", "onnx", "openai"] = "torch"
    # Models on the onnx backend: none = the fp32 export (same vectors as torch, cosine
    # >= 0.9999), int8 = quantised (faster, cosine >= 0.995 to fp32 or refused at export; its
    # own cache entries).
    onnx_quantize: Literal["none", "int8"] = "none"
    # Where ONNX exports are looked for and made; unset = <data_dir>/onnx. An image that bakes
    # its exports in (deploy/Dockerfile) points here, outside the data volume.
    onnx_export_dir: Path | None = None
    # More models served beside it: ``name=source`` or ``name=backend:source`` pairs,
    # comma-separated (``small=openai:text-embedding-3-small``, a cross-encoder directory:
    # ``ranker=cross-encoder:/models/ranker``).
    extra_models: str = ""
    # Per served model (by its name): prompts, default prompt and long-text windows, as JSON:
    # ``{"e5": {"prompts": {"query": "query: ", "document": "passage: "}}}``.
    model_options: dict[str, ModelOptions] = Field(default_factory=dict)
    # Intra-op threads per model; 0 = the cores this process may really use.
    model_threads: int = Field(0, ge=0)
    api_keys: str = ""
    # A TOML or YAML file of hashed keys, each with a name and its own limits (see auth.py).
    api_keys_file: Path | None = None
    rate_limit_rpm: int = Field(0, ge=0)
    rate_limit_tpm: int = Field(0, ge=0)
    # Tokens per minute a key's batch jobs may use, a budget apart from its online one; unset =
    # the key's own tpm (keys file) or rate_limit_tpm; 0 = unlimited.
    rate_limit_batch_tpm: int | None = Field(None, ge=0)
    # The upstream of models with the ``openai`` backend (OpenAI or any compatible API).
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: SecretStr = SecretStr("")
    # The upstream model's full vector size; 0 = OpenAI's published size for its models, else
    # learned from the first response.
    openai_dimensions: int = Field(0, ge=0)
    # What the upstream bills per million input tokens (text-embedding-3-small's list price),
    # for the cost the cache saved.
    openai_price_per_million_tokens: float = Field(0.02, ge=0)

    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    jobs: JobsSettings = Field(default_factory=JobsSettings)
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)

    @property
    def distributed(self) -> bool:
        return bool(self.redis_url)

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url

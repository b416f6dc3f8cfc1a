"""The master's one typed configuration; defaults documented beside each field.

Contract: built once per process (by the command line or a test) and read everywhere else;
nothing in ``master_core`` reads ``os.environ``.  ``validate()`` raises ``ValueError`` with one
clear line for an inconsistent configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker_core.address import is_loopback


@dataclass(frozen=True)
class MasterConfig:
    model: str = "default"  # checkpoint folder, hub id, or "default" (embedded SmolLM2-135M-Instruct)
    host: str = "127.0.0.1"  # API, dashboard and tunnel address; loopback unless an API key is set
    port: int = 8000  # 0 picks a free port (tests)
    min_workers: int = 1  # serve only while at least this many workers are members (fewer: the group waits)
    api_key: str | None = None  # required for any non-loopback host; /v1/* then needs "Authorization: Bearer <key>"
    allowed_hosts: tuple[str, ...] = ()  # extra Host names the API and dashboard answer to (loopback always)
    body_timeout: float = 30.0  # seconds to receive a whole request body (slow-loris bodies get 408)
    logits_topk: int = 64  # the last stage returns only the top-k logits per row (0: all; see sampling)
    max_batch_tokens: int = 512  # tokens in one pipeline step (prefill chunk budget), per micro-batch
    max_running: int = 64  # requests decoding at once
    max_queued: int = 256  # requests waiting beyond those; more get HTTP 429
    max_prompt_tokens: int = 8192  # longer prompts get HTTP 400 (also bounded by the model's context)
    max_tokens_limit: int = 4096  # largest max_tokens a client may ask for
    default_max_tokens: int = 256  # when a request does not say
    max_body_bytes: int = 4 * 1024 * 1024  # larger HTTP bodies get 413
    max_kv_tokens: int = 65536  # KV cache cap per stage, in tokens
    prefix_cache: bool = True  # keep ended requests' KV on the stages and reuse cached prompt prefixes
    # draft tokens from each request's own tokens (prompt lookup) and verify them in one step
    # (master_core.speculation); off by default: it pays on slow links and text that repeats its prompt
    speculative: bool = False
    # a local folder of a small causal LM sharing the served model's tokenizer: it drafts greedily on
    # the master where prompt lookup finds nothing (worker_core.draft_model); implies speculative
    draft_model: str = ""
    policy: str = "full"  # scheduling policy: full | no-chunking | fixed-microbatches | single-microbatch
    microbatches: int | None = None  # force this many micro-batches in flight (None: the policy decides)
    assign_timeout: float = 900.0  # seconds a worker may take to load its layers
    step_retries: int = 3  # times a request is replayed after a failed step before it fails
    # how every worker stores its decoder layers: none (the compute dtype), int8 or int4
    # (bitsandbytes; worker_core.quantize); embeddings and LM head stay in the compute dtype
    quantize: str = "none"
    capacity_wait: float = 0.0  # seconds requests wait for a group that cannot serve before a 503 ends them
    retry_after: int = 10  # seconds a 503 of a group that cannot serve tells clients to wait (Retry-After)
    # a paired group (``molink group create``): state lives in data_dir; workers pair, then
    # open mutually authenticated TLS tunnels on group_host:group_port and receive their
    # weights from the master.  None: plain tunnels on the API port, loopback only (tests).
    data_dir: str | None = None
    group_host: str = "::"  # address of the group port (tunnels and pairing); "::": every interface, IPv4 and IPv6
    group_port: int = 7733  # 0 picks a free port (tests)
    group_name: str = ""  # shown to joiners (default: this machine's host name)
    # ask the home router to map the group port (UPnP IGD, NAT-PMP, PCP: master_core.reach);
    # never for a loopback group_host
    port_mapping: bool = True
    # HOST:PORT of a relay (``molink relay``) the group registers at, so members and joiners who
    # cannot reach the group port reach it through the relay ("": none); paired groups only
    relay: str = ""

    def validate(self) -> None:
        if not 0 <= self.port <= 65535 or not 0 <= self.group_port <= 65535:
            raise ValueError(f"port {self.port} out of range")
        if self.min_workers < 1:
            raise ValueError("--min-workers must be at least 1")
        if not is_loopback(self.host) and not self.api_key:
            raise ValueError(
                f"binding {self.host} exposes the API beyond this machine: give --api-key, "
                "or store a key with `molink api-key --new`"
            )
        from worker_core.wire import QUANTIZE_CHOICES

        if self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"unknown --quantize {self.quantize!r}; use {', '.join(QUANTIZE_CHOICES)}")
        from .scheduler import POLICIES

        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; known: {', '.join(POLICIES)}")
        for name in (
            "max_batch_tokens",
            "max_running",
            "max_queued",
            "max_prompt_tokens",
            "max_tokens_limit",
            "max_kv_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.relay:
            from worker_core.bridge_wire import split_address

            split_address(self.relay)
            if self.data_dir is None:
                raise ValueError("--relay needs a paired group (molink group create): a relay keeps its mutual TLS")
        if self.capacity_wait < 0 or self.retry_after < 1:
            raise ValueError("capacity_wait must be >= 0 and retry_after >= 1")

"""The MoLink wire protocol: every message that crosses a worker tunnel, and nothing else.

Contract
--------
* One binary frame per message::

      b"MLK" | version: u8 | kind: u8 | header_len: u32 (big endian) | header | payload

  ``header`` is UTF-8 JSON (at most ``MAX_HEADER_BYTES``) holding the message's fields;
  ``payload`` is the raw bytes of at most one tensor, described in the header by
  ``{"dtype": str, "shape": [int, ...]}`` (a weight ``Chunk`` carries plain bytes instead).
  Tensors are rebuilt with ``torch.frombuffer``: network bytes are never unpickled or
  ``torch.load``-ed.
* :func:`decode` parses a frame into one of the typed message classes below, checking every
  field (types, ranges, lengths, dtype, shape against byte length, the frame size limit).  Any
  defect raises :class:`ProtocolError`; the caller closes that one connection.  ``assert`` is
  never used for validation.
* :func:`encode` is its inverse.  ``decode(encode(m)) == m`` for every valid message.
* Semantic checks that need state (is this request id known? is this the right hidden size?)
  belong to the receiver, which also answers with :class:`ProtocolError`.
* A worker answers the master's WebSocket pings with a *pulse* as the pong's payload
  (:func:`pulse`, :func:`read_pulse`): how many compute calls its stage has finished and
  whether one is running now, so the master tells a stage that computes slowly from one whose
  compute is stuck while its event loop still answers.
* The protocol's own vocabulary lives here too, so both sides share one definition: the
  manifest entry :class:`TensorSpec`, the hub snapshot syntax ``HUB_REF``, tunnel close codes
  (:class:`CloseCode`), dtype sizes (:func:`itemsize`), the logits row of a ``Result``
  (:func:`logits_row_width`) and frame bounds (:func:`frame_bound`, :func:`worker_frame_bound`).
* A leaf module: it imports only the standard library and torch, nothing of MoLink.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any

import torch

QUANTIZE_CHOICES = ("none", "int8", "int4")  # Assign.quantize (worker_core.quantize.Precision)
PROTOCOL_VERSION = 13  # 3: Leave; 4: TensorSpec.gguf_type; 5: Hello.machine, .threads; 6: direct hops; 7: Recall;
# 8: Assign.tapes (a standby keeps its copy of the caches for the range it takes, master_core.shadow), Routed.moved;
# 9: Fill (a stage that took over its lost neighbour's layers computes their caches);
# 10: Assign.copy_end (a stage keeps a copy of the next stage's layers and caches);
# 11: Assign.copy_first (the second stage keeps a copy of the first stage's too);
# 12: Part (a longer frame sent in pieces, worker_core.pieces, so a decode step's frame goes between them);
# 13: the master sends in pieces too (a relayed step, a weight chunk, a Fill), master_core.link
MAGIC = b"MLK"
_PREFIX = struct.Struct(">3sBBI")  # magic, version, kind, header_len

MAX_HEADER_BYTES = 256 * 1024
MAX_ASSIGN_HEADER_BYTES = 16 * 1024 * 1024  # an Assign carries the range's tensor manifest
MAX_CHUNK_BYTES = 4 * 1024 * 1024  # weight bytes in one Chunk
MAX_FRAME_BYTES = 1 << 30  # absolute ceiling; connections use a tighter computed bound
MAX_TENSOR_DIMS = 4
MAX_SEGMENTS = 4096
MAX_NAME_CHARS = 128
MAX_POSITION = 1 << 24  # tokens; no real context is longer
MAX_ID = (1 << 63) - 1
MAX_TOPK = 4096  # logits per row a last stage may be asked for
MAX_LAYERS = 1 << 16  # decoder layers of a model
MAX_LOOP = 256  # steps a last stage may feed back to the first stage on its own (Step.loop)
MAX_TEMPERATURE = 100.0  # a Draw's temperature at most
MAX_DRAFTS = 16  # tokens a last stage may draft for one segment of a fed-back step (Draw.k)
MAX_HISTORY = 1 << 20  # tokens of a request a Draw may carry for drafting (Draw.history)
MAX_TOKEN_ID = (1 << 24) - 1

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# a hub repository id (owner/name) and a hub snapshot (owner/name@commit) as ``Assign.hub`` carries
# it; worker_core.model_source takes its hub-id syntax from here (one pattern for both)
HUB_REPO = r"[A-Za-z0-9][\w.\-]*/[\w.\-]+"
HUB_REF = re.compile(f"^{HUB_REPO}@[0-9a-f]{{40}}$")
SAFETENSORS_DTYPES = frozenset(
    {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"}
)
# GGML tensor types a GGUF model's tensors may travel as: name -> (elements per block, bytes per block);
# the same numbers as ``gguf.GGML_QUANT_SIZES`` (worker_core.gguf_source checks they agree)
GGUF_TYPES: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
_SHA = re.compile(r"^[0-9a-f]{64}$")
_REPO_FILE = re.compile(r"^[\w.\-]+(/[\w.\-]+)*$")


class CloseCode(IntEnum):
    """WebSocket close codes of a tunnel, chosen by what ended it (never by message text)."""

    NORMAL = 1000  # left, removed, stopped, lost
    PROTOCOL_ERROR = 1002  # the peer broke this protocol


def itemsize(dtype: str) -> int:
    """Bytes per element of a compute dtype named as in ``DTYPES`` (e.g. ``Hello.dtype``)."""
    return DTYPES[dtype].itemsize


def logits_row_width(topk: int, vocab_size: int) -> int:
    """Float32 values in one logits row of a last stage's :class:`Result`: the packed
    ``1 + 2k`` when ``0 < topk < vocab_size``, else the whole vocabulary."""
    return 1 + 2 * topk if 0 < topk < vocab_size else vocab_size


class ProtocolError(Exception):
    """A peer sent a frame that breaks this protocol; drop that peer, nothing else."""


class Kind(IntEnum):
    HELLO = 1
    ASSIGN = 2
    READY = 3
    STEP = 4
    RESULT = 5
    FREE = 6
    FAILURE = 7
    FETCH = 8
    CHUNK = 9
    LEAVE = 10
    ROUTE = 11
    ROUTED = 12
    RECALL = 13
    FILL = 14
    PART = 15


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Hello:
    """worker -> master, first frame: who I am and what I can hold."""

    name: str
    device: str  # "cpu" | "cuda:0" ...
    device_name: str  # human readable, e.g. "NVIDIA GeForce RTX 3080" or the CPU model
    total_memory: int  # bytes usable for weights + KV on the device
    free_memory: int  # bytes this worker offers for weights + KV
    dtype: str  # compute dtype the worker will use, one of DTYPES
    gflops: float = 0.0  # measured matmul speed at start-up (0: unknown)
    compute_capability: str = ""  # CUDA devices, e.g. "8.6" ("" on a CPU)
    driver: str = ""  # NVIDIA driver version ("" on a CPU)
    ram_total: int = 0  # bytes of system memory
    cpu_cores: int = 0
    rtt_ms: float = 0.0  # measured round trip to the master just before this tunnel (0: unknown)
    link_mbps: float = 0.0  # measured master -> worker bandwidth, Mbit/s (0: unknown)
    # the hardware it computes on, for the scheduler: an opaque id equal for workers on the same
    # device of the same machine (they share it), and the torch CPU threads it computes with
    # (0 on a GPU)
    machine: str = ""
    threads: int = 0
    # direct hops: the port of this worker's hop listener (0: none) and the host others should
    # dial ("": the address the master sees this tunnel come from)
    hop_port: int = 0
    hop_host: str = ""
    hop_lan: str = ""  # the local address this tunnel leaves from (behind a NAT: the LAN address)
    dialled: str = ""  # "host:port" this tunnel dialled (a master's candidate), "" when not said
    # "host:port" of the relay where this worker registers its hop listener under its own
    # certificate's fingerprint (a paired group's relay), "" for none: the previous stage may
    # reach it through there when no direct address answers (absent in an older worker's Hello)
    hop_relay: str = ""


def gguf_nbytes(gguf_type: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of logical ``shape`` (torch order) takes stored as ``gguf_type`` blocks;
    ValueError when the type is unknown or the rows do not split into whole blocks."""
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"GGUF tensor type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    block_elements, block_bytes = GGUF_TYPES[gguf_type]
    if not shape or shape[-1] % block_elements:
        raise ValueError(f"shape {list(shape)} does not split into whole {gguf_type} blocks of {block_elements}")
    return math.prod(shape) // block_elements * block_bytes


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a delivered layer range: an entry of an ``Assign`` manifest.

    A tensor of a safetensors checkpoint travels as its bytes (``dtype``, ``shape``).  A tensor of
    a GGUF model travels as the file's raw blocks: ``gguf_type`` names their GGML type (one of
    ``GGUF_TYPES``), ``shape`` is the logical (dequantized, torch-order) shape, ``dtype`` is "U8"
    and ``nbytes`` the blocks' length, which must be exactly what that type and shape take."""

    name: str
    dtype: str  # safetensors dtype, e.g. "F32" ("U8" for GGUF blocks)
    shape: tuple[int, ...]
    nbytes: int
    sha256: str  # hex digest of the tensor's bytes
    # where the same bytes lie in the model's hub repository (models from the hub only):
    # ``[offset, offset + nbytes)`` of ``file``
    file: str = ""
    offset: int = 0
    gguf_type: str = ""  # GGML type of the raw blocks ("" for a safetensors tensor), e.g. "Q4_0"

    def as_json(self) -> dict:
        out = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "sha256": self.sha256,
        }
        out |= {"file": self.file, "offset": self.offset} if self.file else {}
        return out | ({"gguf_type": self.gguf_type} if self.gguf_type else {})

    @staticmethod
    def parse(raw: object) -> TensorSpec:
        """From a peer's JSON; ValueError on any defect."""
        if not isinstance(raw, dict):
            raise ValueError("a tensor spec must be an object")
        name, dtype, shape, nbytes, sha = (
            raw.get("name"),
            raw.get("dtype"),
            raw.get("shape"),
            raw.get("nbytes"),
            raw.get("sha256"),
        )
        if not isinstance(name, str) or not 0 < len(name) <= 512:
            raise ValueError("bad tensor name")
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"bad tensor dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > 8 or any(type(d) is not int or d < 0 for d in shape):
            raise ValueError("bad tensor shape")
        if type(nbytes) is not int or not 0 <= nbytes <= 1 << 40:
            raise ValueError("bad tensor size")
        if not isinstance(sha, str) or not _SHA.match(sha):
            raise ValueError("bad tensor hash")
        file, offset = raw.get("file", ""), raw.get("offset", 0)
        if (
            not isinstance(file, str)
            or len(file) > 512
            or (file and not _REPO_FILE.match(file))
            or ".." in file.split("/")
        ):
            raise ValueError("bad tensor file: a relative path in the repository")
        if type(offset) is not int or not 0 <= offset <= 1 << 48:
            raise ValueError("bad tensor offset")
        gguf_type = raw.get("gguf_type", "")
        if not isinstance(gguf_type, str):
            raise ValueError("bad GGUF tensor type")
        if gguf_type:
            if gguf_type not in GGUF_TYPES:
                raise ValueError(f"GGUF tensor type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
            if dtype != "U8" or file:
                raise ValueError("GGUF blocks travel as U8 bytes from the master only")
            if not 0 < len(shape) <= MAX_TENSOR_DIMS or any(d == 0 for d in shape):
                raise ValueError(f"bad GGUF tensor shape {shape}")
            if gguf_nbytes(gguf_type, tuple(shape)) != nbytes:
                raise ValueError(f"{nbytes} bytes do not hold a {gguf_type} tensor of shape {shape}")
        return TensorSpec(name, dtype, tuple(shape), nbytes, sha, file, offset, gguf_type)


@dataclass(frozen=True)
class Assign:
    """master -> worker: load decoder layers [layer_start, layer_end) of ``model``."""

    epoch: int  # placement generation; steps of older epochs are refused
    model: str  # checkpoint folder the worker can read
    layer_start: int
    layer_end: int
    num_layers: int  # layers in the whole model
    max_batch_tokens: int  # upper bound on tokens in one step
    kv_tokens: int  # KV cache budget of this stage, in tokens over all requests
    # weights delivered by the master (paired groups): the model's config.json and the
    # tensors of this range; empty: the worker reads ``model`` itself
    config_json: str = ""
    manifest: tuple[TensorSpec, ...] = ()
    # "owner/name@commit" when the model comes from the hub: the worker may read the
    # manifest's tensors from there (each spec's file and offset) before asking the master
    hub: str = ""
    # how the worker stores its decoder layers: "none" (the compute dtype), "int8" or "int4"
    # (worker_core.quantize); a master that does not send it means "none"
    quantize: str = "none"
    # a range ending at the last layer, where the loop-back drafts: the draft model to hold too
    # (worker_core.draft_model), as ``model``, ``config_json`` and ``manifest`` name the range's
    # weights (a folder, or a digest with the draft's config and every tensor it needs); "" none.
    # A draft that fails to load costs only the drafts (Ready.draft_seconds stays 0)
    draft_model: str = ""
    draft_config_json: str = ""
    draft_manifest: tuple[TensorSpec, ...] = ()
    # layer ends inside the range where the hidden states leaving them are kept too, as a stage
    # ending there keeps them to rebuild the next one (``Recall``): a standby member's whole model
    # keeps the serving pipeline's stage ends, so that the copy of the open requests' caches it
    # computes (master_core.shadow) serves whichever range it takes over; absent in older frames
    tapes: tuple[int, ...] = ()
    # > layer_end: the next stage's layers [layer_end, copy_end) are loaded too, unserved; the
    # master fills their caches in the background (``Fill`` of those layers from the rows kept
    # leaving layer_end) so that, were that stage lost, this one takes its layers over with them
    # (an Assign of [layer_start, copy_end)); 0: none
    copy_end: int = 0
    # the first stage's layers [0, layer_start) are loaded too, unserved: the second stage keeps
    # their caches as it keeps the next stage's (``Fill`` of those layers from the token ids), so
    # that, were the first stage lost, it takes them over (an Assign of [0, layer_end))
    copy_first: bool = False


@dataclass(frozen=True)
class Ready:
    """worker -> master: the assignment of ``epoch`` is loaded."""

    epoch: int
    hidden_size: int
    vocab_size: int
    load_seconds: float
    weight_bytes: int
    draft_seconds: float = 0.0  # > 0: the Assign's draft model is loaded; seconds a drafted token costs


@dataclass(frozen=True)
class Segment:
    """Tokens ``[start, start + length)`` of one request inside a step."""

    request_id: int  # the request's KV id on the stages
    start: int  # position of the first token of this segment
    length: int
    want_logits: bool  # last stage: return logits of the segment's last token
    # the KV id's generation: a segment at 0 (or with ``base``) starts generation ``generation``
    # (never an older one than the stage holds); any other must name the generation the stage
    # holds, so a late step of a journey given up on is refused, never written
    generation: int = 0
    # nonzero: the request is new here and its first ``start`` tokens are those of the cached KV id
    # ``base`` (a prefix held on every stage, shared, never written again); needs ``start`` > 0
    base: int = 0
    # with ``want_logits``: the logits of the segment's last ``rows`` tokens (1 <= rows <= length),
    # in order: a speculative step verifies drafted tokens (master_core.speculation); else 1
    rows: int = 1

    @property
    def logit_rows(self) -> int:
        """Rows of logits the last stage returns for this segment."""
        return self.rows if self.want_logits else 0


@dataclass(frozen=True)
class Draw:
    """How a last stage draws one segment's tokens (``Step.loop``): at ``temperature`` 0 the
    argmax, else from the nucleus ``top_p`` with the request's ``seed``, each row's token with
    the generator of the position it goes to (:func:`worker_core.sampling.token_generator`).

    Drafting inside the loop-back (``k`` > 0): the last stage drafts up to ``k`` tokens by
    prompt lookup (:mod:`worker_core.lookup`) over ``history`` (the request's tokens, carried
    by the step the master sent) and what it drew since, and sends them with the next token in
    the fed-back step (its segment then wants ``1 + len(drafts)`` rows, ``drafts`` naming them).
    A draft is accepted while each row's drawn token equals it; the first that differs (or the
    token after the last draft) ends that segment's step, and the next step starts there (the
    stages' fence truncates the rest).  ``left``: tokens the request may still take from this
    step on: the drafts of a fed-back step leave at least one token for every step after it,
    so the loop never runs past ``max_tokens`` or the context."""

    temperature: float
    top_p: float
    seed: int
    k: int = 0
    left: int = 0
    history: tuple[int, ...] = ()
    drafts: tuple[int, ...] = ()
    # drafts the stage's draft model (Assign.draft_model) may make where prompt lookup finds
    # nothing (0: it is not asked)
    model_k: int = 0


@dataclass(frozen=True)
class Step:
    """master -> worker (or stage i -> stage i+1 over a direct hop): run these segments.
    tensor: token ids [T] int64 on the first stage, hidden states [T, hidden] elsewhere (T = sum
    of segment lengths).  ``topk`` > 0 asks the last stage for only the k largest logits of each
    row (see :class:`Result`).  ``forward``: send the output on to the next stage over this
    stage's direct hop, when it has one, as a ``Step`` of the same id (else return a ``Result``
    to the master); ``trail``: compute seconds of the stages this step already went through
    since it left the master, ``held``: the seconds each of them held it (from its arrival to
    handing it on: queue, pauses and compute; empty from a stage that does not say).  ``loop``
    (at most ``MAX_LOOP``), read by the last stage only:
    draw each segment's tokens as its ``draws`` entry says (one per segment, present iff
    ``loop`` > 0; :mod:`worker_core.sampling`), name them in the ``Result`` (``tokens``, one
    per row; ``drafts``, what it drafted) and feed the next step back to the first stage over
    the loop-back hop as step ``step_id + 1`` (each segment continuing with one token and the
    drafts the last stage made, :class:`Draw`; ``forward`` set, ``loop - 1``); every segment
    must want logits.  When it cannot, it answers that next step with a ``Failure``.  ``drop``: KV
    ids to free first, carried in the step itself (a ``Free`` over the tunnel can reach a stage
    after a step that came over a direct hop and needs the room)."""

    step_id: int
    epoch: int
    segments: tuple[Segment, ...]
    tensor: torch.Tensor = field(compare=False)
    topk: int = 0
    forward: bool = False
    trail: tuple[float, ...] = ()
    held: tuple[float, ...] = ()
    loop: int = 0
    draws: tuple[Draw, ...] = ()
    drop: tuple[int, ...] = ()  # KV ids every stage it reaches frees before it runs (the master evicted them)


@dataclass(frozen=True)
class Result:
    """worker -> master: output of ``step_id``.  tensor: hidden [T, hidden] or, on the last
    stage, for the n rows the segments want (``Segment.logit_rows``, in segment order): logits
    [n, vocab] float32, or with ``topk`` = k
    the packed rows [n, 1 + 2k] float32 = (logsumexp of the full row, the k largest logits in
    descending order, their token ids as exact integers)."""

    step_id: int
    epoch: int
    compute_seconds: float  # the forward itself
    worker_seconds: float  # from the step's arrival at the worker to its result (queue + compute)
    tensor: torch.Tensor = field(compare=False)
    trail: tuple[float, ...] = ()  # compute seconds of the earlier stages of a forwarded step, in order
    held: tuple[float, ...] = ()  # the seconds each of those held it (Step.held)
    tokens: tuple[int, ...] = ()  # the tokens a last stage drew and fed back, one per row (Step.loop)
    # drafting in the loop-back (Draw.k): per segment, the drafts the fed-back step carries
    drafts: tuple[tuple[int, ...], ...] = ()
    by_model: tuple[bool, ...] = ()  # per segment: its drafts are the draft model's (empty: none are)
    draft_seconds: float = 0.0  # with by_model: what a drafted token costs the step waiting for it (a running measure)


@dataclass(frozen=True)
class Recall:
    """master -> worker (any stage but the last): send back, as the ``Result`` of ``step_id``
    (``compute_seconds`` 0, tensor [T, hidden] packed in segment order), the hidden states this
    stage sent on for each segment's positions, as it keeps them for its requests' caches.
    The master rebuilds a replaced next stage's KV from them (:mod:`master_core.rebuild`).
    Only ``request_id``, ``start`` and ``length`` of a segment are read."""

    step_id: int
    epoch: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class Fill:
    """master -> worker: this stage was given the layers ``[layer_start, layer_end)`` of a lost
    neighbour on top of its own (an ``Assign`` widening its range keeps its caches): compute
    those layers' keys and values for each segment's positions, which its own layers hold
    already, from ``tensor`` (token ids [T] int64 when the layers start the model, else hidden
    states [T, hidden]) or, with an empty ``tensor``, from the rows it kept leaving
    ``layer_start`` (its old end).  Answered by a ``Result`` of ``step_id`` with an empty tensor.
    A request's positions come in order, from 0, under its KV id's generation or a newer one; a
    step of it starting beyond the positions filled is refused."""

    step_id: int
    epoch: int
    segments: tuple[Segment, ...]
    layer_start: int
    layer_end: int
    tensor: torch.Tensor = field(compare=False)


@dataclass(frozen=True)
class Free:
    """master -> worker: drop the KV cache of these requests (unknown ids are ignored)."""

    request_ids: tuple[int, ...]


@dataclass(frozen=True)
class Failure:
    """either way: a request-level or step-level failure the peer should know about."""

    message: str
    step_id: int = -1
    # the last stage could not feed step ``step_id`` back (``Step.loop``): no stage computed it
    # on its account, so every stage holds what it held before it (a copy that got through
    # before the hop went down writes what a resend writes); absent in older frames
    unsent: bool = False


@dataclass(frozen=True)
class Fetch:
    """worker -> master: send bytes ``[offset, offset + length)`` of the tensor with this hash
    (one listed in the current Assign's manifest)."""

    sha256: str
    offset: int
    length: int


@dataclass(frozen=True)
class Chunk:
    """master -> worker: the bytes a ``Fetch`` asked for, with their own SHA-256."""

    sha256: str  # the tensor's
    offset: int
    chunk_sha256: str
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class Leave:
    """worker -> master: this worker leaves the group.  ``finish`` False: now (the master
    re-plans without it and replays the running requests); True: once the requests running
    when this arrives have ended (bounded by the master).  The master then closes the tunnel."""

    finish: bool


@dataclass(frozen=True)
class Route:
    """master -> worker, once a pipeline of ``epoch`` is loaded: this stage's direct hops.
    ``accept_token``: the secret the previous stage presents when it dials this worker's hop
    listener ("": accept none), with ``accept_cert`` the PEM certificate it must present (paired
    groups; "" in a plain group).  ``next_address`` ("host:port", "": relay the next hop through
    the master), ``next_cert`` and ``next_token``: how to dial the next stage.  Each Route
    replaces the last; the worker answers ``Routed``."""

    epoch: int
    accept_token: str = ""
    accept_cert: str = ""
    next_address: str = ""
    next_cert: str = ""
    next_token: str = ""
    # "host:port" of a relay where the next stage's hop listener is registered (by the fingerprint
    # of ``next_cert``): dialled there when ``next_address`` is "" or does not answer ("": none;
    # an older worker ignores it and relays that hop through the master)
    next_relay: str = ""


@dataclass(frozen=True)
class Routed:
    """worker -> master: the outcome of a ``Route``: whether the hop to the next stage is direct
    (dialled and open), the handshake's duration, and why not when it is not; and ``mapped``
    ("host:port", or ""): where this worker's home router forwards to its hop listener from
    outside (a port mapping the router confirmed, with a public address), so that a stage in
    another home can dial it."""

    epoch: int
    direct: bool
    connect_ms: float = 0.0
    reason: str = ""
    mapped: str = ""
    through: str = ""  # "host:port" of the relay the open hop crosses ("": direct, or no hop)
    moved: bool = False  # the epoch's open hop moved to this path by itself (not an answer to a Route)


@dataclass(frozen=True)
class Part:
    """A piece of a longer frame (:mod:`worker_core.pieces` cuts and joins them): at most
    ``PART_BYTES`` of it, in order; ``last`` on its final piece."""

    data: bytes
    last: bool


PART_BYTES = 16 * 1024  # bytes of a frame in one Part

Message = (
    Hello
    | Assign
    | Ready
    | Step
    | Result
    | Recall
    | Fill
    | Free
    | Failure
    | Fetch
    | Chunk
    | Leave
    | Route
    | Routed
    | Part
)

MAX_CERT_CHARS = 16 * 1024  # a PEM certificate in a Route
_TOKEN = re.compile(r"^([0-9a-f]{32,128})?$")
_ADDRESS = re.compile(r"^([A-Za-z0-9.\-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]):[0-9]{1,5}$")


# --------------------------------------------------------------------------- field parsing


def _int(h: dict[str, Any], key: str, lo: int = 0, hi: int = MAX_ID) -> int:
    v = h.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise ProtocolError(f"field {key!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _float(h: dict[str, Any], key: str) -> float:
    v = h.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        raise ProtocolError(f"field {key!r} must be a finite non-negative number, got {v!r}")
    return float(v)


def _str(h: dict[str, Any], key: str, max_chars: int = MAX_NAME_CHARS) -> str:
    v = h.get(key)
    if type(v) is not str or len(v) > max_chars:
        raise ProtocolError(f"field {key!r} must be a string of at most {max_chars} chars")
    return v


def _bool(h: dict[str, Any], key: str) -> bool:
    v = h.get(key)
    if type(v) is not bool:
        raise ProtocolError(f"field {key!r} must be a boolean")
    return v


def _tapes(h: dict[str, Any]) -> tuple[int, ...]:
    """``Assign.tapes``: distinct, ascending layer ends (at most 1024)."""
    v = h.get("tapes", [])
    if type(v) is not list or len(v) > 1024 or any(type(t) is not int for t in v) or v != sorted(set(v)):
        raise ProtocolError("field 'tapes' must be a list of distinct ascending integers")
    return tuple(v)


def _dtype_name(h: dict[str, Any], key: str) -> str:
    v = _str(h, key)
    if v not in DTYPES:
        raise ProtocolError(f"field {key!r}: unsupported dtype {v!r}")
    return v


def _host(h: dict[str, Any], key: str) -> str:
    """A host name or IP address a peer may be dialled at ("" allowed)."""
    v = _str(h, key, 253)
    if v and not _ADDRESS.match(f"[{v}]:1" if ":" in v else f"{v}:1"):
        raise ProtocolError(f"field {key!r} is not a host name or address: {v!r}")
    return v


def _optional_address(h: dict[str, Any], key: str) -> str:
    """A "host:port" field added in version 7 or later, "" allowed (absent from an older peer's frame: "")."""
    v = _str(h, key, 260) if key in h else ""
    if v and not _ADDRESS.match(v):
        raise ProtocolError(f"field {key!r} is not host:port: {v!r}")
    return v


def _sha(h: dict[str, Any], key: str) -> str:
    v = h.get(key)
    if type(v) is not str or len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise ProtocolError(f"field {key!r} must be a hex SHA-256")
    return v


def _manifest(h: dict[str, Any], key: str = "manifest") -> tuple[TensorSpec, ...]:
    raw = h.get(key, [])
    if type(raw) is not list or len(raw) > 1 << 18:
        raise ProtocolError(f"{key!r} must be a list of tensor specs")
    try:
        return tuple(TensorSpec.parse(x) for x in raw)
    except ValueError as e:
        raise ProtocolError(f"bad manifest entry: {e}") from None


def _segments(h: dict[str, Any]) -> tuple[Segment, ...]:
    raw = h.get("segments")
    if type(raw) is not list or not 1 <= len(raw) <= MAX_SEGMENTS:
        raise ProtocolError(f"'segments' must be a list of 1..{MAX_SEGMENTS} entries")
    out = []
    seen: set[int] = set()
    for s in raw:
        if type(s) is not dict:
            raise ProtocolError("a segment must be an object")
        seg = Segment(
            request_id=_int(s, "request_id"),
            start=_int(s, "start", 0, MAX_POSITION),
            length=_int(s, "length", 1, MAX_POSITION),
            want_logits=_bool(s, "want_logits"),
            generation=_int({"generation": s.get("generation", 0)}, "generation"),
            base=_int({"base": s.get("base", 0)}, "base"),
            rows=_int({"rows": s.get("rows", 1)}, "rows", 1, MAX_POSITION),
        )
        if not 1 <= seg.rows <= seg.length or (seg.rows > 1 and not seg.want_logits):
            raise ProtocolError(
                f"request {seg.request_id}: 'rows' ({seg.rows}) must be in [1, length {seg.length}], "
                "and above 1 only with want_logits"
            )
        if seg.base and (seg.start == 0 or seg.base == seg.request_id):
            raise ProtocolError(f"request {seg.request_id}: a cached prefix needs start > 0 and another KV id")
        if seg.request_id in seen:
            raise ProtocolError(f"request {seg.request_id} appears twice in one step")
        seen.add(seg.request_id)
        out.append(seg)
    return tuple(out)


def _ids(h: dict[str, Any], key: str) -> tuple[int, ...]:
    ids = h.get(key)
    if type(ids) is not list or len(ids) > 1 << 16 or any(type(i) is not int or not 0 <= i <= MAX_ID for i in ids):
        raise ProtocolError(f"{key!r} must be a list of non-negative integers")
    return tuple(ids)


def _segment_json(s: Segment) -> dict[str, Any]:
    out: dict[str, Any] = {
        "request_id": s.request_id,
        "start": s.start,
        "length": s.length,
        "want_logits": s.want_logits,
    }
    if s.generation:
        out["generation"] = s.generation
    if s.base:
        out["base"] = s.base
    if s.rows != 1:
        out["rows"] = s.rows
    return out


def _draw_json(d: Draw) -> list:
    plain = [d.temperature, d.top_p, d.seed]
    if not (d.k or d.drafts):
        return plain
    drafting = [*plain, d.k, d.left, list(d.history), list(d.drafts)]
    return [*drafting, d.model_k] if d.model_k else drafting


def _draws(h: dict[str, Any]) -> tuple[Draw, ...]:
    raw = h.get("draws", [])
    if type(raw) is not list or len(raw) > MAX_SEGMENTS:
        raise ProtocolError(f"'draws' must be a list of at most {MAX_SEGMENTS} entries")
    out = []
    for d in raw:
        if type(d) is not list or len(d) not in (3, 7, 8):
            raise ProtocolError("a draw is [temperature, top_p, seed] (and k, left, history, drafts, model_k)")
        temperature, top_p = _float({"temperature": d[0]}, "temperature"), _float({"top_p": d[1]}, "top_p")
        if temperature > MAX_TEMPERATURE or not 0 < top_p <= 1:
            raise ProtocolError(f"a draw needs temperature in [0, {MAX_TEMPERATURE}] and top_p in (0, 1]")
        draw = Draw(temperature, top_p, _int({"seed": d[2]}, "seed", 0, (1 << 64) - 1))
        if len(d) >= 7:
            draw = replace(
                draw,
                k=_int({"k": d[3]}, "k", 0, MAX_DRAFTS),
                left=_int({"left": d[4]}, "left", 0, MAX_POSITION),
                history=_token_list(d[5], "a draw's history", MAX_HISTORY),
                drafts=_token_list(d[6], "a draw's drafts", MAX_DRAFTS),
                model_k=_int({"model_k": d[7]}, "model_k", 0, MAX_DRAFTS) if len(d) == 8 else 0,
            )
        out.append(draw)
    return tuple(out)


def _token_list(raw: object, what: str, most: int) -> tuple[int, ...]:
    if type(raw) is not list or len(raw) > most or any(type(t) is not int or not 0 <= t <= MAX_TOKEN_ID for t in raw):
        raise ProtocolError(f"{what} must be a list of at most {most} token ids")
    return tuple(raw)


def _tokens(h: dict[str, Any]) -> tuple[int, ...]:
    return _token_list(h.get("tokens", []), "'tokens'", MAX_SEGMENTS * (1 + MAX_DRAFTS))


def _result_drafts(h: dict[str, Any]) -> tuple[tuple[int, ...], ...]:
    raw = h.get("drafts", [])
    if type(raw) is not list or len(raw) > MAX_SEGMENTS:
        raise ProtocolError(f"'drafts' must be a list of at most {MAX_SEGMENTS} lists")
    return tuple(_token_list(d, "a segment's drafts", MAX_DRAFTS) for d in raw)


def _by_model(h: dict[str, Any]) -> tuple[bool, ...]:
    raw = h.get("by_model", [])
    if type(raw) is not list or len(raw) > MAX_SEGMENTS or any(type(b) is not bool for b in raw):
        raise ProtocolError(f"'by_model' must be a list of at most {MAX_SEGMENTS} booleans")
    return tuple(raw)


def _trail(h: dict[str, Any], key: str = "trail") -> tuple[float, ...]:
    raw = h.get(key, [])
    if type(raw) is not list or len(raw) > 1024:
        raise ProtocolError(f"{key!r} must be a list of at most 1024 seconds")
    return tuple(_float({"t": v}, "t") for v in raw)


def _tensor_from(h: dict[str, Any], payload: memoryview) -> torch.Tensor:
    spec = h.get("tensor")
    if type(spec) is not dict:
        raise ProtocolError("missing tensor description")
    dtype = DTYPES[_dtype_name(spec, "dtype")]
    shape = spec.get("shape")
    if (
        type(shape) is not list
        or not 1 <= len(shape) <= MAX_TENSOR_DIMS
        or any(type(d) is not int or not 0 <= d <= MAX_FRAME_BYTES for d in shape)
    ):
        raise ProtocolError(f"bad tensor shape {shape!r}")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes != len(payload):
        raise ProtocolError(f"tensor {shape} {spec['dtype']} needs {nbytes} bytes, frame has {len(payload)}")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(payload), dtype=dtype).reshape(shape)


# --------------------------------------------------------------------------- encode / decode


def _tensor_bytes(t: torch.Tensor) -> tuple[dict[str, Any], bytes]:
    if t.dtype not in DTYPE_NAMES:
        raise ValueError(f"cannot send dtype {t.dtype}")
    t = t.detach().contiguous().cpu()
    spec = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)}
    return spec, t.reshape(-1).view(torch.uint8).numpy().tobytes()


HELLO_FIELDS = tuple(f.name for f in dataclasses.fields(Hello))


def encode(msg: Message) -> bytes:
    """Serialize one message to one frame."""
    payload = b""
    if isinstance(msg, Hello):
        kind, h = Kind.HELLO, {k: getattr(msg, k) for k in HELLO_FIELDS}
    elif isinstance(msg, Assign):
        kind, h = (
            Kind.ASSIGN,
            {
                k: getattr(msg, k)
                for k in (
                    "epoch",
                    "model",
                    "layer_start",
                    "layer_end",
                    "num_layers",
                    "max_batch_tokens",
                    "kv_tokens",
                    "config_json",
                    "hub",
                    "quantize",
                )
            },
        )
        if msg.tapes:
            h["tapes"] = list(msg.tapes)
        if msg.copy_end:
            h["copy_end"] = msg.copy_end
        if msg.copy_first:
            h["copy_first"] = True
        h["manifest"] = [s.as_json() for s in msg.manifest]
        if msg.draft_model:
            h["draft_model"], h["draft_config_json"] = msg.draft_model, msg.draft_config_json
            h["draft_manifest"] = [s.as_json() for s in msg.draft_manifest]
    elif isinstance(msg, Ready):
        kind, h = (
            Kind.READY,
            {k: getattr(msg, k) for k in ("epoch", "hidden_size", "vocab_size", "load_seconds", "weight_bytes")},
        )
        if msg.draft_seconds:
            h["draft_seconds"] = msg.draft_seconds
    elif isinstance(msg, Step):
        spec, payload = _tensor_bytes(msg.tensor)
        segs = [_segment_json(s) for s in msg.segments]
        kind, h = (
            Kind.STEP,
            {
                "step_id": msg.step_id,
                "epoch": msg.epoch,
                "segments": segs,
                "topk": msg.topk,
                "tensor": spec,
                "forward": msg.forward,
                "trail": list(msg.trail),
                "held": list(msg.held),
                "loop": msg.loop,
                "draws": [_draw_json(d) for d in msg.draws],
            },
        )
        if msg.drop:
            h["drop"] = list(msg.drop)
    elif isinstance(msg, Result):
        spec, payload = _tensor_bytes(msg.tensor)
        kind, h = (
            Kind.RESULT,
            {
                "step_id": msg.step_id,
                "epoch": msg.epoch,
                "compute_seconds": msg.compute_seconds,
                "worker_seconds": msg.worker_seconds,
                "tensor": spec,
                "trail": list(msg.trail),
                "held": list(msg.held),
                "tokens": list(msg.tokens),
            },
        )
        if msg.drafts:
            h["drafts"] = [list(d) for d in msg.drafts]
        if msg.by_model:
            h["by_model"] = list(msg.by_model)
        if msg.draft_seconds:
            h["draft_seconds"] = msg.draft_seconds
    elif isinstance(msg, Recall):
        segs = [_segment_json(s) for s in msg.segments]
        kind, h = Kind.RECALL, {"step_id": msg.step_id, "epoch": msg.epoch, "segments": segs}
    elif isinstance(msg, Fill):
        spec, payload = _tensor_bytes(msg.tensor)
        segs = [_segment_json(s) for s in msg.segments]
        kind, h = (
            Kind.FILL,
            {
                "step_id": msg.step_id,
                "epoch": msg.epoch,
                "segments": segs,
                "layers": [msg.layer_start, msg.layer_end],
                "tensor": spec,
            },
        )
    elif isinstance(msg, Free):
        kind, h = Kind.FREE, {"request_ids": list(msg.request_ids)}
    elif isinstance(msg, Failure):
        kind, h = Kind.FAILURE, {"message": msg.message, "step_id": msg.step_id}
        if msg.unsent:
            h["unsent"] = True
    elif isinstance(msg, Fetch):
        kind, h = Kind.FETCH, {"sha256": msg.sha256, "offset": msg.offset, "length": msg.length}
    elif isinstance(msg, Chunk):
        kind, h, payload = (
            Kind.CHUNK,
            {"sha256": msg.sha256, "offset": msg.offset, "chunk_sha256": msg.chunk_sha256},
            msg.data,
        )
    elif isinstance(msg, Leave):
        kind, h = Kind.LEAVE, {"finish": msg.finish}
    elif isinstance(msg, Part):
        kind, h, payload = Kind.PART, {"last": msg.last}, msg.data
    elif isinstance(msg, Route):
        kind, h = Kind.ROUTE, {f.name: getattr(msg, f.name) for f in dataclasses.fields(Route)}
    elif isinstance(msg, Routed):
        kind, h = Kind.ROUTED, {f.name: getattr(msg, f.name) for f in dataclasses.fields(Routed)}
    else:
        raise TypeError(f"not a wire message: {type(msg).__name__}")
    header = json.dumps(h, separators=(",", ":")).encode()
    if len(header) > (MAX_ASSIGN_HEADER_BYTES if kind is Kind.ASSIGN else MAX_HEADER_BYTES):
        raise ValueError("header too large")
    return _PREFIX.pack(MAGIC, PROTOCOL_VERSION, kind, len(header)) + header + payload


def frame_kind(frame: bytes | bytearray | memoryview) -> int | None:
    """The kind byte of ``frame``'s prefix, unchecked (None when shorter than the prefix): a look
    at what a frame is without decoding it; :func:`decode` checks everything."""
    return _PREFIX.unpack_from(frame)[2] if len(frame) >= _PREFIX.size else None


def decode(frame: bytes | bytearray | memoryview, max_frame_bytes: int = MAX_FRAME_BYTES) -> Message:
    """Parse and check one frame; raise :class:`ProtocolError` on any defect."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError("expected a binary frame")
    view = memoryview(frame)
    if len(view) > max_frame_bytes:
        raise ProtocolError(f"frame of {len(view)} bytes exceeds the limit of {max_frame_bytes}")
    if len(view) < _PREFIX.size:
        raise ProtocolError("frame shorter than its prefix")
    magic, version, kind_raw, hlen = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise ProtocolError("bad magic: not a MoLink frame")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} unsupported (this side speaks {PROTOCOL_VERSION})")
    try:
        kind = Kind(kind_raw)
    except ValueError:
        raise ProtocolError(f"unknown message kind {kind_raw}") from None
    if hlen > (MAX_ASSIGN_HEADER_BYTES if kind is Kind.ASSIGN else MAX_HEADER_BYTES) or _PREFIX.size + hlen > len(view):
        raise ProtocolError("bad header length")
    try:
        h = json.loads(bytes(view[_PREFIX.size : _PREFIX.size + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ProtocolError(f"header is not valid JSON: {e}") from None
    if type(h) is not dict:
        raise ProtocolError("header must be a JSON object")
    payload = view[_PREFIX.size + hlen :]
    if kind not in (Kind.STEP, Kind.RESULT, Kind.CHUNK, Kind.FILL, Kind.PART) and len(payload):
        raise ProtocolError(f"{kind.name} carries no payload")

    if kind is Kind.HELLO:
        return Hello(
            name=_str(h, "name"),
            device=_str(h, "device"),
            device_name=_str(h, "device_name", 256),
            total_memory=_int(h, "total_memory"),
            free_memory=_int(h, "free_memory"),
            dtype=_dtype_name(h, "dtype"),
            gflops=_float(h, "gflops"),
            compute_capability=_str(h, "compute_capability", 16),
            driver=_str(h, "driver", 64),
            ram_total=_int(h, "ram_total"),
            cpu_cores=_int(h, "cpu_cores", 0, 1 << 16),
            rtt_ms=_float(h, "rtt_ms"),
            link_mbps=_float(h, "link_mbps"),
            machine=_str(h, "machine", 64),
            threads=_int(h, "threads", 0, 1 << 16),
            hop_port=_int(h, "hop_port", 0, 65535),
            hop_host=_host(h, "hop_host"),
            hop_lan=_host(h, "hop_lan"),
            dialled=_optional_address(h, "dialled"),
            hop_relay=_optional_address(h, "hop_relay"),
        )
    if kind is Kind.ASSIGN:
        a = Assign(
            epoch=_int(h, "epoch"),
            model=_str(h, "model", 4096),
            layer_start=_int(h, "layer_start", 0, 1 << 16),
            layer_end=_int(h, "layer_end", 1, 1 << 16),
            num_layers=_int(h, "num_layers", 1, MAX_LAYERS),
            max_batch_tokens=_int(h, "max_batch_tokens", 1, MAX_POSITION),
            kv_tokens=_int(h, "kv_tokens", 1, MAX_ID),
            config_json=_str(h, "config_json", 1 << 20),
            manifest=_manifest(h),
            hub=_str(h, "hub", 512),
            quantize=_str({"quantize": h.get("quantize", "none")}, "quantize", 8),
            draft_model=_str({"draft_model": h.get("draft_model", "")}, "draft_model", 4096),
            draft_config_json=_str({"c": h.get("draft_config_json", "")}, "c", 1 << 20),
            draft_manifest=_manifest(h, "draft_manifest"),
            tapes=_tapes(h),
            copy_end=_int({"copy_end": h.get("copy_end", 0)}, "copy_end", 0, 1 << 16),
            copy_first=_bool(h, "copy_first") if "copy_first" in h else False,
        )
        if not all(a.layer_start < t < a.layer_end for t in a.tapes):
            raise ProtocolError("'tapes' must be layer ends inside the range")
        if a.copy_end and not a.layer_end < a.copy_end <= a.num_layers:
            raise ProtocolError("'copy_end' must be after the range, at most the model's end")
        if a.copy_first and not a.layer_start:
            raise ProtocolError("'copy_first' needs a range after the first stage's")
        if a.draft_model and a.layer_end != a.num_layers:
            raise ProtocolError("only a range ending at the last layer holds a draft model")
        if a.quantize not in QUANTIZE_CHOICES:
            raise ProtocolError(f"'quantize' must be one of {', '.join(QUANTIZE_CHOICES)}")
        if a.hub and not HUB_REF.match(a.hub):
            raise ProtocolError("'hub' must be owner/name@<40-hex commit>")
        if not a.layer_start < a.layer_end <= a.num_layers:
            raise ProtocolError("layer range out of bounds")
        return a
    if kind is Kind.READY:
        return Ready(
            epoch=_int(h, "epoch"),
            hidden_size=_int(h, "hidden_size", 1, 1 << 20),
            vocab_size=_int(h, "vocab_size", 1, 1 << 24),
            load_seconds=_float(h, "load_seconds"),
            weight_bytes=_int(h, "weight_bytes"),
            draft_seconds=_float({"draft_seconds": h.get("draft_seconds", 0.0)}, "draft_seconds"),
        )
    if kind is Kind.STEP:
        segments = _segments(h)
        loop = _int({"loop": h.get("loop", 0)}, "loop", 0, MAX_LOOP)
        draws = _draws(h)
        if len(draws) != (len(segments) if loop else 0):
            raise ProtocolError("a looping step has one draw per segment, any other step none")
        if loop and any(seg.rows != 1 + len(d.drafts) for seg, d in zip(segments, draws)):
            raise ProtocolError("a looping step wants one row of logits per segment and per draft it carries")
        return Step(
            step_id=_int(h, "step_id"),
            epoch=_int(h, "epoch"),
            segments=segments,
            tensor=_tensor_from(h, payload),
            topk=_int(h, "topk", 0, MAX_TOPK),
            forward=_bool({"forward": h.get("forward", False)}, "forward"),
            trail=_trail(h),
            held=_trail(h, "held"),
            loop=loop,
            draws=draws,
            drop=_ids({"drop": h.get("drop", [])}, "drop"),
        )
    if kind is Kind.RESULT:
        return Result(
            step_id=_int(h, "step_id"),
            epoch=_int(h, "epoch"),
            compute_seconds=_float(h, "compute_seconds"),
            worker_seconds=_float(h, "worker_seconds"),
            tensor=_tensor_from(h, payload),
            trail=_trail(h),
            held=_trail(h, "held"),
            tokens=_tokens(h),
            drafts=_result_drafts(h),
            by_model=_by_model(h),
            draft_seconds=_float({"draft_seconds": h.get("draft_seconds", 0.0)}, "draft_seconds"),
        )
    if kind is Kind.RECALL:
        return Recall(step_id=_int(h, "step_id"), epoch=_int(h, "epoch"), segments=_segments(h))
    if kind is Kind.FILL:
        layers = h.get("layers")
        if type(layers) is not list or len(layers) != 2 or any(type(x) is not int for x in layers):
            raise ProtocolError("'layers' must be [start, end]")
        if not 0 <= layers[0] < layers[1] <= MAX_LAYERS:
            raise ProtocolError(f"bad layer range {layers!r}")
        return Fill(
            step_id=_int(h, "step_id"),
            epoch=_int(h, "epoch"),
            segments=_segments(h),
            layer_start=layers[0],
            layer_end=layers[1],
            tensor=_tensor_from(h, payload),
        )
    if kind is Kind.FREE:
        return Free(request_ids=_ids(h, "request_ids"))
    if kind is Kind.FETCH:
        return Fetch(sha256=_sha(h, "sha256"), offset=_int(h, "offset"), length=_int(h, "length", 1, MAX_CHUNK_BYTES))
    if kind is Kind.CHUNK:
        if len(payload) > MAX_CHUNK_BYTES:
            raise ProtocolError("chunk too large")
        return Chunk(
            sha256=_sha(h, "sha256"),
            offset=_int(h, "offset"),
            chunk_sha256=_sha(h, "chunk_sha256"),
            data=bytes(payload),
        )
    if kind is Kind.LEAVE:
        return Leave(finish=_bool(h, "finish"))
    if kind is Kind.PART:
        if not 0 < len(payload) <= PART_BYTES:
            raise ProtocolError(f"a part carries 1 to {PART_BYTES} bytes, not {len(payload)}")
        return Part(bytes(payload), _bool(h, "last"))
    if kind is Kind.ROUTE:
        route = Route(
            epoch=_int(h, "epoch"),
            accept_token=_str(h, "accept_token"),
            accept_cert=_str(h, "accept_cert", MAX_CERT_CHARS),
            next_address=_str(h, "next_address", 260),
            next_cert=_str(h, "next_cert", MAX_CERT_CHARS),
            next_token=_str(h, "next_token"),
            next_relay=_optional_address(h, "next_relay"),
        )
        if not (_TOKEN.match(route.accept_token) and _TOKEN.match(route.next_token)):
            raise ProtocolError("hop tokens must be 32..128 lower-case hex digits")
        if route.next_address and (not _ADDRESS.match(route.next_address) or not route.next_token):
            raise ProtocolError(f"bad next hop {route.next_address!r}: host:port with a token")
        if route.next_relay and not (route.next_token and route.next_cert):
            raise ProtocolError("a next hop through a relay needs a token and the next stage's certificate")
        return route
    if kind is Kind.ROUTED:
        routed = Routed(
            epoch=_int(h, "epoch"),
            direct=_bool(h, "direct"),
            connect_ms=_float(h, "connect_ms"),
            reason=_str(h, "reason", 512),
            mapped=_str(h, "mapped", 300) if "mapped" in h else "",
            through=_optional_address(h, "through"),
            moved=_bool(h, "moved") if "moved" in h else False,
        )
        if routed.mapped and not _ADDRESS.match(routed.mapped):
            raise ProtocolError(f"bad mapped hop address {routed.mapped!r}: host:port")
        return routed
    unsent = _bool(h, "unsent") if "unsent" in h else False
    return Failure(message=_str(h, "message", 4096), step_id=_int(h, "step_id", -1), unsent=unsent)


_PULSE = struct.Struct(">QB")  # compute calls finished (mod 2**64), one running now (0/1)


def pulse(progress: int, computing: bool) -> bytes:
    """A pong's payload: the stage's finished compute calls and whether one runs now."""
    return _PULSE.pack(progress % (1 << 64), int(computing))


def read_pulse(data: bytes) -> tuple[int, bool] | None:
    """``(progress, computing)`` from a pong's payload, or None when it carries none (a worker
    with no stage yet) or something else (never an error: a pong is only a sign of life)."""
    if len(data) != _PULSE.size:
        return None
    progress, computing = _PULSE.unpack(data)
    return (progress, computing == 1) if computing in (0, 1) else None


def frame_bound(max_batch_tokens: int, hidden_size: int, vocab_size: int, element_bytes: int = 4) -> int:
    """Largest legitimate frame (bytes) for a pipeline with these dimensions: the bigger of a
    full hidden-state step and a logits result for every token, plus header room."""
    tensor = max_batch_tokens * max(hidden_size, vocab_size) * element_bytes
    return min(MAX_FRAME_BYTES, tensor + MAX_HEADER_BYTES + _PREFIX.size)


# frames a worker must accept whatever the model: an Assign with its manifest, a weight Chunk
UNASSIGNED_FRAME_BYTES = max(_PREFIX.size + MAX_ASSIGN_HEADER_BYTES, _PREFIX.size + MAX_HEADER_BYTES + MAX_CHUNK_BYTES)


def worker_frame_bound(max_batch_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Largest frame a worker accepts once it serves a range of this model: the pipeline's
    :func:`frame_bound` (the master's own limit), or an Assign or Chunk (``UNASSIGNED_FRAME_BYTES``)."""
    return max(UNASSIGNED_FRAME_BYTES, frame_bound(max_batch_tokens, hidden_size, vocab_size))

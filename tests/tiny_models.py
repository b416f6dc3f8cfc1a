"""Tiny random-weight Hugging Face checkpoints, built offline in fixtures.

Contract: ``make_tiny_checkpoint(arch, path, num_layers=4, seed=0, tie_embeddings=False,
sharded=False, config=None)`` writes a complete checkpoint folder (config, generation config,
safetensors weights — one file, or several with an index when ``sharded`` — and a byte-level
BPE tokenizer trained offline with ``tokenizers``, with a chat template: the families of
``TOOL_FAMILIES`` get their tool format, ``TOOL_TEMPLATE``) that transformers
loads with no network; ``config`` overrides fields of the family's config (e.g. more experts).
The same arguments give the same files.  ``reference_greedy(path, prompt, n)`` is the
single-process transformers answer: exactly ``n`` greedy new tokens (EOS does not stop it; the
engine under test must be told ``ignore_eos`` for a comparison).
Adding a family is one entry in ``_FAMILIES``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

VOCAB = 384
_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    initializer_range=0.2,
)

# arch -> (config class name, model class name, extra config)
_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 32}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 64,
        },
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64},
    ),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"sliding_window": 32, "query_pre_attn_scalar": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"sliding_window": 32, "query_pre_attn_scalar": 16}),
    "phi": ("PhiConfig", "PhiForCausalLM", {"partial_rotary_factor": 0.5}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 64, "n_head": 4, "n_positions": 512, "n_inner": 128}),
    "bloom": ("BloomConfig", "BloomForCausalLM", {"n_head": 4}),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        {"num_kv_heads": 2, "new_decoder_architecture": True, "head_dim": ...},
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", {}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.5}),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        {
            "num_key_value_heads": 4,
            "kv_lora_rank": 32,
            "q_lora_rank": None,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "moe_intermediate_size": 32,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "head_dim": ...,
        },
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        {
            "num_key_value_heads": 4,
            "kv_lora_rank": 32,
            "q_lora_rank": 32,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "moe_intermediate_size": 32,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "head_dim": ...,
        },
    ),
}
ARCHITECTURES: tuple[str, ...] = tuple(_FAMILIES)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)

# The tool format of the Qwen 2.5/3 (Hermes) family, written for the tiny tokenizer: tools listed
# in the system turn, calls as <tool_call> JSON blocks, results as <tool_response> blocks.  Without
# tools it renders exactly as CHAT_TEMPLATE does.
TOOL_TEMPLATE = (
    "{% if tools %}<|bos|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "# Tools\nYou may call one or more functions. Their signatures are in <tools></tools>:\n<tools>\n"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>\n"
    "For each call, return a JSON object with the function name and arguments in <tool_call></tool_call> tags:\n"
    '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|eos|>\n'
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' and loop.first and tools %}"
    "{% elif m['role'] == 'tool' %}<|bos|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|eos|>\n"
    "{% elif m['role'] == 'assistant' and m.tool_calls %}<|bos|>assistant\n{{ m['content'] or '' }}"
    "{% for c in m.tool_calls %}\n<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>'
    "{% endfor %}<|eos|>\n"
    "{% else %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)
TOOL_FAMILIES = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")  # their real models define this tool format

_WORDS = (  # noqa: SIM905 - a sentence reads better than a list of words
    "the a group of friends pools their graphics cards to serve one large model over slow home links "
    "every machine runs a worker that dials out to the master which schedules batches and streams tokens "
    "layers are cut into ranges and activations travel from stage to stage until logits come back"
).split()


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(_WORDS[int(i)] for i in torch.randint(len(_WORDS), (12,), generator=g)) for _ in range(300)]
    tok.train_from_iterator(lines, trainer)
    return tok.to_str()


def _save_tokenizer(path: Path, chat_template: str = CHAT_TEMPLATE) -> int:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
    )
    fast.chat_template = chat_template
    fast.save_pretrained(path)
    return len(fast)


def make_tiny_checkpoint(
    arch: str,
    path: Path,
    *,
    num_layers: int = 4,
    seed: int = 0,
    tie_embeddings: bool = False,
    sharded: bool = False,
    config: dict[str, Any] | None = None,
) -> Path:
    import transformers

    if arch not in _FAMILIES:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    cfg_name, model_name, extra = _FAMILIES[arch]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = _save_tokenizer(path, TOOL_TEMPLATE if arch in TOOL_FAMILIES else CHAT_TEMPLATE)
    config = getattr(transformers, cfg_name)(
        vocab_size=vocab,
        num_hidden_layers=num_layers,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **{k: v for k, v in {**_COMMON, **extra, **(config or {})}.items() if v is not ...},  # ... drops a field
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    kwargs: dict[str, Any] = {"max_shard_size": "100KB"} if sharded else {}
    model.save_pretrained(path, **kwargs)
    return path


@functools.lru_cache(maxsize=64)
def _load(path: str) -> Callable:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.inference_mode()
def _greedy(model: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt_ids) :].tolist()


def reference_greedy(path: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    return _greedy(_load(str(path)), prompt_ids, max_new_tokens)


def make_tiny_gguf(
    path: Path,
    qtype: str,
    *,
    num_layers: int = 4,
    seed: int = 0,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    tie_embeddings: bool = False,
    raw_types: dict[str, str] | None = None,
) -> Path:
    """Write a random tiny llama as a GGUF file the way llama.cpp's converter would: q/k rows
    permuted into its rotary layout, matrices as ``qtype`` blocks (``gguf.quants.quantize``),
    1-D tensors (norms) as F32, the model's hyper-parameters under ``llama.*`` and the tokenizer
    of the embedded default model's GGUF (``tokenizer.*`` keys copied), so the vocabulary is its
    49152 tokens.  ``raw_types`` (GGUF name -> GGML type) writes those tensors as zero blocks of
    a type ``gguf`` cannot quantize (e.g. an IQ type).  Same arguments, same file."""
    import gguf
    import numpy as np
    import transformers

    from worker_core.default_model import _gguf_path

    source = gguf.GGUFReader(_gguf_path())
    vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    head_dim = hidden_size // num_attention_heads
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie_embeddings,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        model = transformers.LlamaForCausalLM(config).eval()
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # not all ones: the norms must really be read
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, num_layers)

    def permute(w: np.ndarray, n_head: int) -> np.ndarray:  # llama.cpp's q/k permutation (HF -> GGUF)
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(num_layers)
    writer.add_context_length(512)
    writer.add_embedding_length(hidden_size)
    writer.add_feed_forward_length(intermediate_size)
    writer.add_head_count(num_attention_heads)
    writer.add_head_count_kv(num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    for key, field in source.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub)
    quant = gguf.GGMLQuantizationType[qtype]
    state = model.state_dict()
    for name, tensor in state.items():
        if name == "lm_head.weight" and tie_embeddings:
            continue
        base, _, suffix = name.rpartition(".")
        gname = f"{names.get_name(base)}.{suffix}"
        w = tensor.float().numpy()
        if ".attn_q." in gname:
            w = permute(w, num_attention_heads)
        elif ".attn_k." in gname:
            w = permute(w, num_key_value_heads)
        if gname in (raw_types or {}):
            raw = gguf.GGMLQuantizationType[(raw_types or {})[gname]]
            block, size = gguf.GGML_QUANT_SIZES[raw]
            zeros = np.zeros((*w.shape[:-1], w.shape[-1] // block * size), dtype=np.uint8)
            writer.add_tensor(gname, zeros, raw_shape=zeros.shape, raw_dtype=raw)
        elif w.ndim == 1 or quant == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gname, np.ascontiguousarray(w, dtype=np.float32))
        else:
            q = gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), quant)
            writer.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@functools.lru_cache(maxsize=8)
def _load_gguf(path: str) -> Callable:
    from transformers import AutoModelForCausalLM

    p = Path(path)
    return AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()


def reference_greedy_gguf(path: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """``reference_greedy`` of a GGUF file, as transformers loads it (dequantized, float32)."""
    return _greedy(_load_gguf(str(path)), prompt_ids, max_new_tokens)

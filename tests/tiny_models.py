"""Tiny randomly initialised models of every supported family, for fast deterministic tests.

Every model has 2 decoder layers, hidden size 64 (vision tower 32) and ``vocab_size`` 8192 so
that the real byte-level BPE tokenizer of the shared ``deepseek-v2-moe-25m`` model
(:func:`tiny_tokenizer`, vocabulary 8192) can drive them end to end. MoE families mix one dense
and one MoE layer where the architecture allows it (DeepSeek ``first_k_dense_replace=1``,
Qwen3-MoE ``mlp_only_layers=[0]``) so tests see both kinds of block.

Other engineers' end-to-end tests import this module: keep it fast (a model builds in well under
a second) and deterministic (same ``seed`` ⇒ bit-identical weights).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from compresskit.paths import shared_models_dir

VOCAB_SIZE = 8192
HIDDEN = 64
LAYERS = 2

# Common to the decoder-only families; each builder overrides what its config names differently.
_BASE = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=HIDDEN,
    intermediate_size=128,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
    tie_word_embeddings=False,
)


def _llama() -> PreTrainedModel:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_BASE))


def _mistral() -> PreTrainedModel:
    return transformers.MistralForCausalLM(transformers.MistralConfig(**_BASE, sliding_window=None))


def _qwen2() -> PreTrainedModel:
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_BASE))


def _qwen3() -> PreTrainedModel:
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_BASE, head_dim=16))


def _gemma2() -> PreTrainedModel:
    cfg = transformers.Gemma2Config(**_BASE, head_dim=16, sliding_window=16)
    return transformers.Gemma2ForCausalLM(cfg)


def _gemma3() -> PreTrainedModel:
    cfg = transformers.Gemma3TextConfig(**_BASE, head_dim=16, sliding_window=16)
    return transformers.Gemma3ForCausalLM(cfg)


def _phi3() -> PreTrainedModel:
    cfg = transformers.Phi3Config(**{**_BASE, "pad_token_id": 0})
    return transformers.Phi3ForCausalLM(cfg)


def _opt() -> PreTrainedModel:
    # word_embed_proj_dim != hidden_size gives OPT its project_in / project_out linears (as in
    # OPT-350m), which must run before block 0.
    cfg = transformers.OPTConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        ffn_dim=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=256,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.OPTForCausalLM(cfg)


def _gpt_neox() -> PreTrainedModel:
    cfg = transformers.GPTNeoXConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPTNeoXForCausalLM(cfg)


def _mixtral() -> PreTrainedModel:
    cfg = transformers.MixtralConfig(**_BASE, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    return transformers.MixtralForCausalLM(cfg)


def _qwen2_moe() -> PreTrainedModel:
    cfg = transformers.Qwen2MoeConfig(
        **_BASE,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=96,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_only_layers=[],
    )
    return transformers.Qwen2MoeForCausalLM(cfg)


def _qwen3_moe() -> PreTrainedModel:
    cfg = transformers.Qwen3MoeConfig(
        **_BASE,
        head_dim=16,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_only_layers=[0],
    )
    return transformers.Qwen3MoeForCausalLM(cfg)


_MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, head_dim=8)


def _deepseek_v2() -> PreTrainedModel:
    cfg = transformers.DeepseekV2Config(
        **{**_BASE, "num_key_value_heads": 4},
        **_MLA,
        q_lora_rank=None,  # V2-Lite style: a plain q_proj
        moe_intermediate_size=32,
        n_routed_experts=4,
        n_shared_experts=2,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        topk_method="greedy",
    )
    return transformers.DeepseekV2ForCausalLM(cfg)


def _deepseek_v3() -> PreTrainedModel:
    cfg = transformers.DeepseekV3Config(
        **{**_BASE, "num_key_value_heads": 4},
        **_MLA,
        q_lora_rank=24,  # V3 style: q_a_proj -> norm -> q_b_proj
        moe_intermediate_size=32,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
    )
    return transformers.DeepseekV3ForCausalLM(cfg)


def _llava() -> PreTrainedModel:
    text = transformers.LlamaConfig(**_BASE)
    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    cfg = transformers.LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=VOCAB_SIZE - 1,
        image_seq_length=16,
        vision_feature_layer=-1,
    )
    return transformers.LlavaForConditionalGeneration(cfg)


_BUILDERS: dict[str, Callable[[], PreTrainedModel]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "phi3": _phi3,
    "opt": _opt,
    "gpt_neox": _gpt_neox,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3,
    "llava": _llava,
}

TINY_FAMILIES: list[str] = list(_BUILDERS)
MOE_FAMILIES: list[str] = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]


def tiny_model(family: str, seed: int = 0) -> PreTrainedModel:
    """A fresh fp32 model of ``family`` with seeded random weights, in eval mode, no KV cache.

    Weights are re-drawn from ``torch.manual_seed(seed)`` so two calls give identical models; the
    global RNG state is restored afterwards so tests stay independent of call order.
    """
    if family not in _BUILDERS:
        raise KeyError(f"unknown tiny family {family!r}; choose from {', '.join(TINY_FAMILIES)}")
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = _BUILDERS[family]()
    finally:
        torch.random.set_rng_state(rng_state)
    model.config.use_cache = False
    return model.eval()


@lru_cache(maxsize=1)
def _load_tiny_tokenizer() -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    shared = shared_models_dir() / "deepseek-v2-moe-25m"
    if (shared / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(shared))
    return _trained_tokenizer()


def _trained_tokenizer() -> PreTrainedTokenizerBase:
    """Without ``../shared`` (a user's clone): a byte-level BPE of the same size and special tokens
    (``<|endoftext|>`` = id 0 = bos = eos = pad, nothing added around a text), trained in about a
    second on the demo texts the package ships. Deterministic; tests that need the real tokenizer's
    exact ids read ``../shared`` and skip without it."""
    import json as _json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from compresskit.demo_data import CALIBRATION_FILE, PERPLEXITY_FILE

    texts = [_json.loads(line)["text"] for line in CALIBRATION_FILE.read_text().splitlines() if line.strip()]
    texts += PERPLEXITY_FILE.read_text().split("\n\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """The real 8192-token BPE tokenizer of the shared deepseek-v2-moe-25m model, loaded offline.

    Its ids fit every tiny model (``vocab_size`` 8192); pad = eos = bos = id 0, as in the tiny
    configs. Cached: callers must not mutate it (set padding side per call instead).
    """
    return _load_tiny_tokenizer()


def assert_cache_equals_no_cache(model: PreTrainedModel, attn_impl: str | None = None) -> None:
    """Greedy ``generate()`` with KV cache equals it without, on a left-padded batch of two: with a
    padded batch the attention mask depends on the cache's length, so a removed attention that left
    its cache slot wrong gives different tokens or scores here."""
    if attn_impl is not None:
        model.config._attn_implementation = attn_impl
    x = torch.randint(1, 8000, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    x[1, :2] = 0
    kw = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True,
              pad_token_id=0, eos_token_id=None, attention_mask=mask)
    with torch.no_grad():
        cached = model.generate(x, use_cache=True, **kw)
        plain = model.generate(x, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(plain.scores), rtol=1e-4, atol=1e-4)

"""Where each supported model family keeps its decoder blocks, sublayers and norms.

Families are data, not subclasses: one :class:`Family` per architecture names the module holding
the decoder blocks, the modules that run before block 0, and a :class:`BlockLayout` saying which
children of a block are attention, MLP and norms. Adding a family with a Llama-like layout is one
entry in ``FAMILIES``. The names were read from the installed ``transformers`` (5.x) modeling
files; where 4.x used another name (Mixtral's ``block_sparse_moe``) both are listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class BlockLayout:
    """Child names inside one decoder block.

    ``attention_order`` lists attention linears in the order the forward pass applies them; any
    other ``nn.Linear`` found under the attention module is appended in registration order, so an
    unexpected extra projection is never silently skipped. ``mlp_names`` are candidates tried in
    order; an empty tuple means the MLP linears sit directly in the block (OPT's ``fc1``/``fc2``).
    ``pre_mlp_norm`` is the norm whose output feeds the MLP: ``post_attention_layernorm`` for Llama,
    but Gemma applies ``post_attention_layernorm`` to the attention *output* and feeds the MLP from
    ``pre_feedforward_layernorm``.
    """

    attention: str = "self_attn"
    attention_order: tuple[str, ...] = LLAMA_ATTENTION
    mlp_names: tuple[str, ...] = ("mlp",)
    inline_mlp_linears: tuple[str, ...] = ()
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    pre_mlp_norm: str = "post_attention_layernorm"
    extra_norms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Family:
    """One architecture family.

    ``decoder_paths``: candidate paths (tried in order, "" = the model itself, for a bare base
    model) of the module whose ``layers`` attribute is the block list. ``embeddings``: children of
    that module that run before block 0 (any ``rotary_emb*`` child is added automatically).
    ``final``: children that run after the last block. ``wrapper``: a vision-language model
    whose blocks follow the layout of its ``config.text_config.model_type`` family.
    """

    name: str
    model_types: tuple[str, ...]
    decoder_paths: tuple[str, ...] = ("model", "")
    embeddings: tuple[str, ...] = ("embed_tokens",)
    final: tuple[str, ...] = ("norm",)
    layout: BlockLayout = field(default_factory=BlockLayout)
    moe: bool = False
    wrapper: bool = False


_GEMMA_LAYOUT = BlockLayout(
    pre_mlp_norm="pre_feedforward_layernorm",
    extra_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"),
)
_MLA_LAYOUT = BlockLayout(
    # DeepSeek multi-head latent attention: q_proj when q_lora_rank is None, else q_a -> q_b.
    attention_order=("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
)

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",)),
    Family("mistral", ("mistral",)),
    Family("qwen2", ("qwen2",)),
    Family("qwen3", ("qwen3",)),
    Family("gemma2", ("gemma2",), layout=_GEMMA_LAYOUT),
    Family("gemma3", ("gemma3_text",), layout=_GEMMA_LAYOUT),
    Family("phi3", ("phi3",), layout=BlockLayout(attention_order=("qkv_proj", "o_proj"))),
    Family(
        "opt",
        ("opt",),
        decoder_paths=("model.decoder", "decoder", ""),
        embeddings=("embed_tokens", "embed_positions", "project_in"),
        final=("final_layer_norm", "project_out"),
        layout=BlockLayout(
            attention_order=("q_proj", "k_proj", "v_proj", "out_proj"),
            mlp_names=(),
            inline_mlp_linears=("fc1", "fc2"),
            input_norm="self_attn_layer_norm",
            post_attention_norm="final_layer_norm",
            pre_mlp_norm="final_layer_norm",
        ),
    ),
    Family(
        "gpt_neox",
        ("gpt_neox",),
        decoder_paths=("gpt_neox", ""),
        embeddings=("embed_in", "emb_dropout"),
        final=("final_layer_norm",),
        layout=BlockLayout(attention="attention", attention_order=("query_key_value", "dense")),
    ),
    Family("mixtral", ("mixtral",), layout=BlockLayout(mlp_names=("mlp", "block_sparse_moe")), moe=True),
    Family("qwen2_moe", ("qwen2_moe",), moe=True),
    Family("qwen3_moe", ("qwen3_moe",), moe=True),
    Family("deepseek_v2", ("deepseek_v2",), layout=_MLA_LAYOUT, moe=True),
    Family("deepseek_v3", ("deepseek_v3",), layout=_MLA_LAYOUT, moe=True),
    Family(
        "llava",
        ("llava", "llava_next"),
        decoder_paths=("model.language_model", "language_model"),
        wrapper=True,
    ),
)

_BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}


def family_for_model_type(model_type: str | None) -> Family | None:
    return _BY_MODEL_TYPE.get(model_type or "")


def supported_families() -> list[str]:
    return [f.name for f in FAMILIES]

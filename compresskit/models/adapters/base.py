"""``ModelAdapter``: one API over every supported decoder architecture.

Methods and the engine speak only to the adapter, never to ``model.model.layers`` directly
(design notes, "Architecture adapters"). Everything is looked up on the live model at each call,
so modules replaced by a method (pruned experts, low-rank factors, an unfused experts module)
are seen by the next caller. Names returned by ``*_path`` / ``block_name`` are full module paths
in the model as given, so include/exclude filters on module names work for wrappers too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from compresskit.errors import UnsupportedArchitectureError
from compresskit.models.adapters.families import Family
from compresskit.models.adapters.moe import (
    MoEView,
    build_moe_view,
    is_moe_module,
    router_and_gate_names,
    unfuse_experts,
)


class ModelAdapter:
    """Where the blocks, sublayers, norms, linears and experts of one model are.

    ``family`` is the family name (``"llava"`` for a vision-language wrapper, whose block layout
    is that of ``text_family``). ``blocks_path`` is e.g. ``"model.layers"``,
    ``"model.decoder.layers"`` (OPT), ``"gpt_neox.layers"``, ``"model.language_model.layers"``
    (LLaVA in transformers 5).
    """

    def __init__(self, model: nn.Module, family: Family, layout_family: Family, decoder_path: str):
        self.model = model
        self.family = family.name
        self.text_family = layout_family.name
        self.layout = layout_family.layout
        self.decoder_path = decoder_path
        self.blocks_path = f"{decoder_path}.layers" if decoder_path else "layers"
        self._embedding_names = layout_family.embeddings
        self._final_names = layout_family.final

    def __repr__(self) -> str:
        return f"ModelAdapter(family={self.family!r}, blocks_path={self.blocks_path!r}, num_blocks={self.num_blocks})"

    # ---- blocks -------------------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        """The module whose ``layers`` are the blocks (``LlamaModel``, ``OPTDecoder``, ...)."""
        return self.model.get_submodule(self.decoder_path)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.blocks_path)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block(self, i: int) -> nn.Module:
        return self.blocks[i]

    def block_name(self, i: int) -> str:
        self._check_index(i)
        return f"{self.blocks_path}.{i}"

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.num_blocks:
            raise IndexError(f"block {i} out of range: the model has {self.num_blocks} blocks")

    # ---- modules outside the blocks -----------------------------------------------------------
    def embedding_modules(self) -> list[nn.Module]:
        """Every module a forward runs before block 0: token (and position) embeddings, OPT's
        ``project_in``, the rotary embedding that computes the cos/sin passed into each block.

        With these on the compute device and the blocks anywhere else, a forward reaches block 0
        with its inputs on the compute device (the engine captures them there).
        """
        decoder = self.decoder
        names = list(self._embedding_names)
        names += [n for n, _ in decoder.named_children() if n.startswith("rotary_emb") and n not in names]
        return [m for n in names if isinstance(m := getattr(decoder, n, None), nn.Module)]

    def head_modules(self) -> list[nn.Module]:
        """Modules run after the last block: final norm (OPT: also ``project_out``) and the LM head."""
        decoder = self.decoder
        mods = [m for n in self._final_names if isinstance(m := getattr(decoder, n, None), nn.Module)]
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        return mods + ([head] if isinstance(head, nn.Module) else [])

    # ---- sublayers ----------------------------------------------------------------------------
    def attention(self, i: int) -> nn.Module:
        return self.block(i).get_submodule(self.layout.attention)

    def attention_path(self, i: int) -> str:
        return f"{self.block_name(i)}.{self.layout.attention}"

    def _mlp_local_name(self, i: int) -> str | None:
        block = self.block(i)
        return next((n for n in self.layout.mlp_names if isinstance(getattr(block, n, None), nn.Module)), None)

    def has_mlp_module(self, i: int) -> bool:
        """False for OPT, whose ``fc1``/``fc2`` sit directly in the decoder layer."""
        return self._mlp_local_name(i) is not None

    def mlp(self, i: int) -> nn.Module:
        name = self._mlp_local_name(i)
        if name is None:
            raise UnsupportedArchitectureError(
                f"{self.family} blocks have no separate MLP module (its linears sit in the block: "
                f"{', '.join(self.layout.inline_mlp_linears)}); use mlp_linears() instead"
            )
        return self.block(i).get_submodule(name)

    def mlp_path(self, i: int) -> str:
        self.mlp(i)  # raises for inline MLPs
        return f"{self.block_name(i)}.{self._mlp_local_name(i)}"

    # ---- norms --------------------------------------------------------------------------------
    def input_norm(self, i: int) -> nn.Module:
        return self.block(i).get_submodule(self.layout.input_norm)

    def post_attention_norm(self, i: int) -> nn.Module:
        """The block's module named like "post attention" (Gemma: a norm of the attention *output*)."""
        return self.block(i).get_submodule(self.layout.post_attention_norm)

    def pre_mlp_norm(self, i: int) -> nn.Module:
        """The norm whose output feeds the MLP (Llama: post_attention_layernorm; Gemma: pre_feedforward_layernorm)."""
        return self.block(i).get_submodule(self.layout.pre_mlp_norm)

    def norms(self, i: int) -> dict[str, nn.Module]:
        """Local name → norm module, for every per-block norm of the family (Gemma has four)."""
        block = self.block(i)
        names = dict.fromkeys((self.layout.input_norm, self.layout.post_attention_norm, *self.layout.extra_norms))
        return {n: m for n in names if isinstance(m := getattr(block, n, None), nn.Module)}

    # ---- linears ------------------------------------------------------------------------------
    def attention_linears(self, i: int) -> dict[str, nn.Linear]:
        prefix = self.layout.attention
        found = _linears_under(self.attention(i), prefix, excluded=set())
        known = [f"{prefix}.{n}" for n in self.layout.attention_order]
        ordered = {name: found[name] for name in known if name in found}
        ordered.update({k: v for k, v in found.items() if k not in ordered})
        return ordered

    def mlp_linears(self, i: int) -> dict[str, nn.Linear]:
        """MLP linears in forward order; for MoE: routed experts (if per-expert or unfused), then
        shared experts. Routers and Qwen-MoE's ``shared_expert_gate`` are excluded."""
        name = self._mlp_local_name(i)
        if name is None:
            block = self.block(i)
            return {n: m for n in self.layout.inline_mlp_linears if isinstance(m := getattr(block, n, None), nn.Linear)}
        mlp = self.block(i).get_submodule(name)
        # the gate of a token-gated shared expert is routing too, also once CD-MoE condensed the layer
        excluded = (router_and_gate_names(mlp) if is_moe_module(mlp)
                    else {"shared_expert_gate"} & {n for n, _ in mlp.named_children()})
        found = _linears_under(mlp, name, excluded)
        # Routed experts before shared experts (both see the same input; a stable, documented order).
        shared_prefixes = tuple(f"{name}.{s}." for s in ("shared_expert", "shared_experts"))
        return {**{k: v for k, v in found.items() if not k.startswith(shared_prefixes)},
                **{k: v for k, v in found.items() if k.startswith(shared_prefixes)}}

    def prunable_linears(self, i: int) -> dict[str, nn.Linear]:
        """Local name inside block ``i`` → ``nn.Linear``: attention linears then MLP linears."""
        return {**self.attention_linears(i), **self.mlp_linears(i)}

    # ---- mixture of experts -------------------------------------------------------------------
    def is_moe(self, i: int) -> bool:
        name = self._mlp_local_name(i)
        return name is not None and is_moe_module(self.block(i).get_submodule(name))

    def moe(self, i: int) -> MoEView | None:
        if not self.is_moe(i):
            return None
        config = getattr(self.model, "config", None)
        text_config = getattr(config, "text_config", None) or config
        top_k = getattr(text_config, "num_experts_per_tok", None)
        return build_moe_view(self.mlp(i), self.mlp_path(i), top_k)

    @contextmanager
    def unfused_experts(self, i: int) -> Iterator[nn.Module | None]:
        """Within the context, block ``i``'s fused experts are per-expert ``nn.Linear`` modules
        (``mlp.experts.3.gate_proj``...) with identical forward math, so hooks and pruners see
        them; on exit the weights are written back into the fused tensors. Yields the experts
        module in use (``None`` for a dense block). A no-op for per-expert or dense blocks."""
        if not self.is_moe(i):
            yield None
            return
        with unfuse_experts(self.mlp(i)) as experts:
            yield experts


def _linears_under(module: nn.Module, prefix: str, excluded: set[str]) -> dict[str, nn.Linear]:
    """``prefix.<name>`` → every ``nn.Linear`` under ``module``, skipping excluded child subtrees."""
    out: dict[str, nn.Linear] = {}
    for name, child in module.named_modules():
        if not name or name.split(".")[0] in excluded:
            continue
        if isinstance(child, nn.Linear):
            out[f"{prefix}.{name}"] = child
    return out

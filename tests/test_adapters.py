"""Architecture adapters on tiny models of every family and on the two real shared MoE models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compresskit.errors import UnsupportedArchitectureError
from compresskit.models import get_adapter, load_model, supported_families
from compresskit.models.adapters.moe import ExpertView, _fused_expert_views
from compresskit.paths import shared_models_dir
from tiny_models import MOE_FAMILIES, TINY_FAMILIES, tiny_model
from conftest import needs_shared

BLOCKS_PATH = {f: "model.layers" for f in TINY_FAMILIES}
BLOCKS_PATH.update(opt="model.decoder.layers", gpt_neox="gpt_neox.layers", llava="model.language_model.layers")

LLAMA_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
# Hand-written expectations: local names in forward order, per (family, block).
EXPECTED_LINEARS = {
    ("llama", 0): LLAMA_LINEARS,
    ("gemma3", 1): LLAMA_LINEARS,
    ("llava", 1): LLAMA_LINEARS,
    ("phi3", 0): ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"],
    ("opt", 0): ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"],
    ("gpt_neox", 1): ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    ("mixtral", 0): LLAMA_LINEARS[:4],
    ("qwen2_moe", 0): LLAMA_LINEARS[:4] + ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"],
    ("qwen3_moe", 0): LLAMA_LINEARS,
    ("qwen3_moe", 1): LLAMA_LINEARS[:4],
    ("deepseek_v2", 0): ["self_attn.q_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    ("deepseek_v3", 1): ["self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj",
                         "self_attn.o_proj", "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj",
                         "mlp.shared_experts.down_proj"],
}
# (experts, intermediate, top_k, has shared experts, has shared-expert gate) of the tiny MoE blocks.
TINY_MOE = {
    "mixtral": (4, 128, 2, False, False),
    "qwen2_moe": (4, 32, 2, True, True),
    "qwen3_moe": (4, 32, 2, False, False),
    "deepseek_v2": (4, 32, 2, True, False),
    "deepseek_v3": (4, 32, 2, True, False),
}
TINY_MOE_BLOCKS = {"mixtral": [0, 1], "qwen2_moe": [0, 1], "qwen3_moe": [1], "deepseek_v2": [1], "deepseek_v3": [1]}


def _text_config(model):
    return getattr(model.config, "text_config", None) or model.config


def _ids(n_tokens: int = 12, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 8000, (batch, n_tokens), generator=g)


# ---- structure ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_blocks_are_the_decoder_layers(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    assert adapter.blocks_path == BLOCKS_PATH[family]
    assert isinstance(adapter.blocks, nn.ModuleList)
    assert adapter.num_blocks == _text_config(model).num_hidden_layers == 2
    for i in range(adapter.num_blocks):
        assert adapter.block_name(i) == f"{BLOCKS_PATH[family]}.{i}"
        assert model.get_submodule(adapter.block_name(i)) is adapter.blocks[i]
        assert model.get_submodule(adapter.attention_path(i)) is adapter.attention(i)
        if adapter.has_mlp_module(i):
            assert model.get_submodule(adapter.mlp_path(i)) is adapter.mlp(i)
    with pytest.raises(IndexError):
        adapter.block_name(2)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_prunable_linears_cover_every_block_linear_except_routing(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    for i in range(adapter.num_blocks):
        block = adapter.blocks[i]
        linears = adapter.prunable_linears(i)
        for name, linear in linears.items():
            assert isinstance(linear, nn.Linear)
            assert block.get_submodule(name) is linear
        routing = set()
        if (view := adapter.moe(i)) is not None:
            routing = {id(m) for m in view.router.modules()}
            if view.shared_expert_gate is not None:
                routing.add(id(view.shared_expert_gate))
        every_linear = {n for n, m in block.named_modules() if isinstance(m, nn.Linear) and id(m) not in routing}
        assert set(linears) == every_linear
        assert not any(n.endswith(("gate", "router", "shared_expert_gate")) for n in linears)
        attn, mlp = adapter.attention_linears(i), adapter.mlp_linears(i)
        assert not set(attn) & set(mlp)
        assert list(linears) == list(attn) + list(mlp)
        assert all(n.startswith(adapter.layout.attention + ".") for n in attn)
        if (family, i) in EXPECTED_LINEARS:
            assert list(linears) == EXPECTED_LINEARS[(family, i)]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_norms_are_block_children(family):
    adapter = get_adapter(tiny_model(family))
    norms = adapter.norms(0)
    block = adapter.blocks[0]
    expected = {"gemma2": 4, "gemma3": 4}.get(family, 2)
    assert len(norms) == expected
    for name, module in norms.items():
        assert block.get_submodule(name) is module
    assert adapter.input_norm(0) is next(iter(norms.values()))
    assert adapter.post_attention_norm(0) in norms.values()
    assert adapter.pre_mlp_norm(0) in norms.values()
    if family.startswith("gemma"):
        assert adapter.pre_mlp_norm(0) is block.pre_feedforward_layernorm
    if family == "opt":
        assert adapter.input_norm(0) is block.self_attn_layer_norm
        assert adapter.pre_mlp_norm(0) is block.final_layer_norm


def test_opt_has_no_separate_mlp_module():
    adapter = get_adapter(tiny_model("opt"))
    assert not adapter.has_mlp_module(0)
    with pytest.raises(UnsupportedArchitectureError, match="fc1, fc2"):
        adapter.mlp(0)
    assert list(adapter.mlp_linears(0)) == ["fc1", "fc2"]


class _ReachedBlock0(Exception):
    pass


def _capture_block0(model, adapter, input_ids):
    captured = {}

    def hook(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _ReachedBlock0

    handle = adapter.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with pytest.raises(_ReachedBlock0), torch.no_grad():
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    finally:
        handle.remove()
    return captured


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_embedding_modules_alone_reach_block0(family):
    """Everything except embedding_modules() goes to the meta device (as if left on another
    device); a forward must still reach block 0 with real CPU inputs equal to the full model's."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    ids = _ids()
    reference = _capture_block0(model, adapter, ids)

    path_of = {id(m): n for n, m in model.named_modules()}
    kept = {path_of[id(m)]: copy.deepcopy(m) for m in adapter.embedding_modules()}
    assert kept, "no embedding modules"
    model.to("meta")
    for path, module in kept.items():
        model.set_submodule(path, module)
    got = _capture_block0(model, adapter, ids)

    hidden = got["args"][0] if got["args"] else got["kwargs"]["hidden_states"]
    ref_hidden = reference["args"][0] if reference["args"] else reference["kwargs"]["hidden_states"]
    assert hidden.device.type == "cpu"
    torch.testing.assert_close(hidden, ref_hidden, rtol=0, atol=0)
    for tensor in _tensors(got["kwargs"]):
        assert tensor.device.type == "cpu"


# ---- unsupported architectures --------------------------------------------------------------------

def test_unknown_architectures_name_the_supported_families():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    for model in (bert, nn.Sequential(nn.Linear(4, 4))):
        with pytest.raises(UnsupportedArchitectureError) as info:
            get_adapter(model)
        message = str(info.value)
        assert "\n" not in message
        for name in supported_families():
            assert name in message
    assert "bert" in str(pytest.raises(UnsupportedArchitectureError, get_adapter, bert).value)


def test_bare_base_model_is_supported():
    model = tiny_model("llama").model  # LlamaModel without the LM head
    adapter = get_adapter(model)
    assert adapter.blocks_path == "layers"
    assert adapter.blocks is model.layers


# ---- mixture of experts ------------------------------------------------------------------------

@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_view_shapes_and_dense_blocks(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    experts, inter, top_k, has_shared, has_gate = TINY_MOE[family]
    hidden = _text_config(model).hidden_size
    for i in range(adapter.num_blocks):
        view = adapter.moe(i)
        if i not in TINY_MOE_BLOCKS[family]:
            assert view is None and not adapter.is_moe(i)
            continue
        assert adapter.is_moe(i) and view.fused
        assert view.num_experts == len(view.experts) == experts
        assert view.top_k == top_k
        assert view.path == adapter.mlp_path(i)
        assert view.experts_module is adapter.mlp(i).experts
        for e, ex in enumerate(view.experts):
            assert ex.index == e
            assert ex.gate.shape == ex.up.shape == (inter, hidden)
            assert ex.down.shape == (hidden, inter)
        assert (view.shared_experts is not None) == has_shared
        assert (view.shared_expert_gate is not None) == has_gate
        if has_gate:
            assert view.shared_expert_gate.out_features == 1


def _assert_views_alias(view, experts_module):
    gate_up, down = experts_module.gate_up_proj, experts_module.down_proj
    inter = gate_up.shape[1] // 2
    last = view.num_experts - 1
    with torch.no_grad():
        view.experts[last].gate[0, 0] = 1.5
        view.experts[last].up[inter - 1, 2] = -2.5
        view.experts[0].down[3, inter - 1] = 3.25
    assert gate_up[last, 0, 0].item() == 1.5
    assert gate_up[last, 2 * inter - 1, 2].item() == -2.5
    assert down[0, 3, inter - 1].item() == 3.25


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_views_alias_fused_storage(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    i = TINY_MOE_BLOCKS[family][-1]
    view = adapter.moe(i)
    _assert_views_alias(view, view.experts_module)
    # gate rows come first in gate_up_proj: the view equals the first half of the fused rows
    gate_up = view.experts_module.gate_up_proj
    inter = gate_up.shape[1] // 2
    assert torch.equal(view.experts[1].gate, gate_up[1, :inter])
    assert torch.equal(view.experts[1].up, gate_up[1, inter:])


def test_transposed_fused_layout_gives_the_same_views():
    model = tiny_model("qwen3_moe")
    experts = get_adapter(model).mlp(1).experts
    transposed = copy.deepcopy(experts)
    transposed.is_transposed = True
    transposed.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach().transpose(1, 2).contiguous())
    transposed.down_proj = nn.Parameter(experts.down_proj.detach().transpose(1, 2).contiguous())
    for a, b in zip(_fused_expert_views(experts), _fused_expert_views(transposed)):
        assert torch.equal(a.gate, b.gate) and torch.equal(a.up, b.up) and torch.equal(a.down, b.down)
    with torch.no_grad():
        _fused_expert_views(transposed)[2].down[5, 7] = 9.0
    assert transposed.down_proj[2, 7, 5].item() == 9.0


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_unfused_experts_same_outputs_and_named_linears(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    i = TINY_MOE_BLOCKS[family][-1]
    experts, inter, *_ = TINY_MOE[family]
    ids = _ids(n_tokens=16, batch=3)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    fused_module = adapter.mlp(i).experts
    outside_names = list(adapter.prunable_linears(i))
    with adapter.unfused_experts(i) as unfused:
        assert adapter.mlp(i).experts is unfused and unfused is not fused_module
        names = list(adapter.prunable_linears(i))
        expert_names = [f"mlp.experts.{e}.{p}" for e in range(experts) for p in ("gate_proj", "up_proj", "down_proj")]
        assert [n for n in names if ".experts." in n] == expert_names
        assert [n for n in names if ".experts." not in n] == outside_names
        assert adapter.prunable_linears(i)["mlp.experts.1.down_proj"].weight.shape == (_text_config(model).hidden_size, inter)
        view = adapter.moe(i)
        assert not view.fused and view.num_experts == experts
        with torch.no_grad():
            inside = model(input_ids=ids).logits
    assert adapter.mlp(i).experts is fused_module
    assert list(adapter.prunable_linears(i)) == outside_names
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(inside, before, rtol=0, atol=1e-6)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_unfused_hooks_see_each_experts_routed_tokens(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    i = TINY_MOE_BLOCKS[family][-1]
    ids = _ids(n_tokens=10, batch=2)
    counts: dict[str, int] = {}

    def count(name):
        def hook(module, args, output):
            counts[name] = counts.get(name, 0) + args[0].shape[0]
        return hook

    with adapter.unfused_experts(i):
        handles = [
            m.register_forward_hook(count(n))
            for n, m in adapter.prunable_linears(i).items()
            if ".experts." in n and n.endswith("gate_proj")
        ]
        with torch.no_grad():
            model(input_ids=ids)
        for h in handles:
            h.remove()
    top_k = adapter.moe(i).top_k
    assert sum(counts.values()) == ids.numel() * top_k  # every token reaches exactly top_k experts


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_edits_inside_unfused_persist(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    i = TINY_MOE_BLOCKS[family][-1]
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with adapter.unfused_experts(i):
        linears = adapter.prunable_linears(i)
        with torch.no_grad():
            linears["mlp.experts.0.gate_proj"].weight.zero_()  # in place
        # replaced parameter (not aliasing any more): must be copied back on exit
        down = linears["mlp.experts.2.down_proj"]
        down.weight = nn.Parameter(torch.zeros_like(down.weight))
    view = adapter.moe(i)
    assert view.fused
    assert torch.count_nonzero(view.experts[0].gate) == 0
    assert torch.count_nonzero(view.experts[2].down) == 0
    assert torch.count_nonzero(view.experts[1].gate) == view.experts[1].gate.numel()
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, before)


def test_unfused_restores_module_after_an_exception_and_nested_is_noop():
    model = tiny_model("deepseek_v2")
    adapter = get_adapter(model)
    fused = adapter.mlp(1).experts
    with pytest.raises(RuntimeError, match="boom"):
        with adapter.unfused_experts(1) as unfused:
            with adapter.unfused_experts(1) as inner:  # already per-expert: no-op
                assert inner is unfused
            assert adapter.mlp(1).experts is unfused
            raise RuntimeError("boom")
    assert adapter.mlp(1).experts is fused
    with adapter.unfused_experts(0) as dense:  # dense block: nothing to unfuse
        assert dense is None


def test_per_expert_views_alias_linear_weights():
    model = tiny_model("mixtral")
    adapter = get_adapter(model)
    with adapter.unfused_experts(0) as unfused:
        view = adapter.moe(0)
        assert isinstance(view.experts[3], ExpertView)
        with torch.no_grad():
            view.experts[3].up[0, 1] = 4.0
        assert unfused[3].up_proj.weight[0, 1].item() == 4.0
    assert adapter.moe(0).experts[3].up[0, 1].item() == 4.0


# ---- the real shared MoE models --------------------------------------------------------------

REAL_MOE = {
    # name: (family, experts, intermediate, top_k, shared intermediate, has shared-expert gate)
    "deepseek-v2-moe-25m": ("deepseek_v2", 16, 160, 4, 320, False),
    "qwen2-moe-26m": ("qwen2_moe", 20, 128, 4, 320, True),
}


@pytest.mark.parametrize("name", sorted(REAL_MOE))
def test_real_moe_models(name):
    family, experts, inter, top_k, shared_inter, has_gate = REAL_MOE[name]
    model, tokenizer = load_model(str(needs_shared(shared_models_dir() / name)), dtype="float32")
    adapter = get_adapter(model)
    assert adapter.family == family and adapter.num_blocks == 8
    assert not adapter.is_moe(0) and adapter.moe(0) is None
    assert [n for n in adapter.mlp_linears(0)] == ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    for i in range(1, 8):
        view = adapter.moe(i)
        assert view.num_experts == experts and view.top_k == top_k and view.fused
        assert all(e.gate.shape == (inter, 320) and e.down.shape == (320, inter) for e in view.experts)
        shared = view.shared_experts
        assert shared.gate_proj.out_features == shared_inter
        assert (view.shared_expert_gate is not None) == has_gate
        assert "mlp.shared_expert_gate" not in adapter.prunable_linears(i)
    ids = tokenizer(["Call me Ishmael. Some years ago", "Natalie sold clips to 48 of her friends"],
                    return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with adapter.unfused_experts(3):
            inside = model(input_ids=ids).logits
    torch.testing.assert_close(inside, before, rtol=0, atol=1e-4)
    _assert_views_alias(adapter.moe(5), adapter.moe(5).experts_module)


def test_block_moved_inside_unfused_context_takes_the_fused_module_along():
    """The engine may move a block (device or dtype) while its experts are unfused: the detached
    fused module must follow on exit, holding the edited weights."""
    model = tiny_model("qwen2_moe")
    adapter = get_adapter(model)
    with adapter.unfused_experts(1):
        adapter.blocks[1].to(torch.float64)
        with torch.no_grad():
            adapter.prunable_linears(1)["mlp.experts.3.up_proj"].weight.fill_(0.5)
    experts = adapter.mlp(1).experts
    assert experts.gate_up_proj.dtype == experts.down_proj.dtype == torch.float64
    assert torch.all(adapter.moe(1).experts[3].up == 0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "deepseek_v2", "llava"])
def test_engine_placement_on_cuda(family):
    """Embeddings on the GPU, blocks on CPU: block 0 receives CUDA inputs; a block moved to the GPU
    inside unfused_experts comes back fused on the GPU with the same outputs."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    for module in adapter.embedding_modules():
        module.to("cuda")
    got = _capture_block0(model, adapter, _ids().cuda())
    hidden = got["args"][0] if got["args"] else got["kwargs"]["hidden_states"]
    assert hidden.device.type == "cuda"
    if adapter.moe(1) is not None:
        block = adapter.blocks[1]
        x = torch.randn(2, 5, model.config.hidden_size)
        with torch.no_grad():
            reference = block.mlp(x)
            with adapter.unfused_experts(1):
                block.to("cuda")
                inside = block.mlp(x.cuda())
        assert adapter.mlp(1).experts.gate_up_proj.device.type == "cuda"
        torch.testing.assert_close(inside.cpu(), reference, rtol=1e-5, atol=1e-5)

"""``LowRankLinear``: a linear layer stored as two thin factors, and swapping it into a model.

WeLore (methods.md §6.3, reference ``lib/LowRankLayer.py``) replaces each low-rank component
W [out, in] by its rank-k SVD truncation split symmetrically:

    W = U S Vᵀ (fp32),   V.weight = √S_k · Vᵀ[:k]  [k, in],   U.weight = U[:, :k] · √S_k  [out, k]

so U.weight @ V.weight = U_k S_k V_kᵀ, the best rank-k approximation (Eckart–Young). Splitting √S
onto both factors keeps their scales equal, which matters when only U and V are fine-tuned.

Unlike the reference we keep the original bias (on U, so the output is U(V(x)) + b), keep the
linear's dtype instead of forcing bf16, and do not cast the input.
State-dict keys: ``<name>.V.weight`` [k, in], ``<name>.U.weight`` [out, k], ``<name>.U.bias``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from compresskit.errors import CheckpointError, InputError
from compresskit.lowrank.plan import WeLorePlan


class LowRankLinear(nn.Module):
    """y = U(V(x)) with V: in → k (no bias) and U: k → out (bias iff the original had one)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"rank {rank} outside [1, {min(in_features, out_features)}] "
                f"for a {out_features}x{in_features} weight"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.V = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.U = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.U(self.V(x))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        sigma_cache: torch.Tensor | None = None,
        svd_device: torch.device | str | None = None,
    ) -> LowRankLinear:
        """Rank-``rank`` SVD truncation of ``linear`` (SVD in fp32, factors cast back).

        ``sigma_cache``: the singular values the rank plan was made from. When given they are
        compared with this SVD's, so a plan computed from a stale cache (another model, an edited
        weight; WeLore's own cache has no key) fails loudly instead of truncating the wrong matrix.
        ``svd_device``: where to run the SVD (e.g. a GPU for a CPU-resident model).
        """
        weight = linear.weight
        if weight.is_meta:
            raise ValueError("cannot factorise a linear on the meta device; load its weights first")
        work = weight.detach().to(device=svd_device or weight.device, dtype=torch.float32)
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        if sigma_cache is not None:
            _check_sigma(s, sigma_cache)
        root = s[:rank].sqrt()
        module = cls(
            linear.in_features,
            linear.out_features,
            rank,
            bias=linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            module.V.weight.copy_(root[:, None] * vh[:rank])
            module.U.weight.copy_(u[:, :rank] * root[None, :])
            if linear.bias is not None:
                module.U.bias.copy_(linear.bias)
        return module

    def merged_weight(self) -> torch.Tensor:
        """U.weight @ V.weight [out, in], multiplied in fp32 and returned in the factors' dtype."""
        u, v = self.U.weight, self.V.weight
        return (u.detach().float() @ v.detach().float()).to(u.dtype)

    def to_linear(self) -> nn.Linear:
        """Dense ``nn.Linear`` holding the merged weight (``--merge``: loads anywhere)."""
        w = self.U.weight
        dense = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.U.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.merged_weight())
            if self.U.bias is not None:
                dense.bias.copy_(self.U.bias)
        return dense

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.U.bias is not None}"
        )


def _check_sigma(fresh: torch.Tensor, cached: torch.Tensor) -> None:
    cached = cached.detach().to(device=fresh.device, dtype=torch.float32).flatten()
    scale = float(fresh.max().clamp_min(1e-30))
    if cached.numel() != fresh.numel() or not torch.allclose(
        fresh, cached, rtol=1e-3, atol=1e-3 * scale
    ):
        raise InputError(
            "cached singular values do not match this weight; "
            "the singular-value cache is stale, recompute it"
        )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _linear_at(model: nn.Module, name: str, error: type[Exception]) -> nn.Linear:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise error(f"{name} is not a module of this model; the rank map does not fit it") from None
    if not isinstance(module, nn.Linear):
        raise error(
            f"{name} is a {type(module).__name__}, not a Linear; "
            "the rank map does not match this model"
        )
    return module


def replace_with_lowrank(
    model: nn.Module,
    plan: WeLorePlan | Mapping[str, int],
    spectra: Mapping[str, torch.Tensor] | None = None,
    svd_device: torch.device | str | None = None,
) -> dict[str, int]:
    """Swap every factorised matrix of ``plan`` for its ``LowRankLinear``; returns name -> rank.

    Names are full module paths (``model.layers.0.self_attn.q_proj``). ``plan`` may be a plain
    rank map. ``spectra`` (same names) enables the stale-cache check of ``from_linear``.
    """
    rank_map = plan.rank_map if isinstance(plan, WeLorePlan) else dict(plan)
    if isinstance(plan, WeLorePlan):
        for p in plan.matrices:
            if p.is_lowrank:
                linear = _linear_at(model, p.name, InputError)
                if tuple(linear.weight.shape) != p.shape:
                    raise InputError(
                        f"{p.name} has shape {tuple(linear.weight.shape)} but the plan expects "
                        f"{p.shape}; the plan was made for another model"
                    )
    for name, rank in rank_map.items():
        linear = _linear_at(model, name, InputError)
        sigma = spectra.get(name) if spectra is not None else None
        _set_submodule(model, name, LowRankLinear.from_linear(linear, rank, sigma, svd_device))
    return rank_map


def install_lowrank_shells(model: nn.Module, rank_map: Mapping[str, int]) -> dict[str, int]:
    """Replace each named ``nn.Linear`` by a zero-filled ``LowRankLinear`` of the mapped rank.

    Used when loading a checkpoint: the U/V weights come afterwards from safetensors. Shells take
    the linear's device and dtype; on the meta device they stay on meta (load with
    ``load_state_dict(..., assign=True)``), otherwise they are allocated without random init.
    """
    for name, rank in rank_map.items():
        linear = _linear_at(model, name, CheckpointError)
        weight = linear.weight
        if not 1 <= int(rank) <= min(weight.shape):
            raise CheckpointError(
                f"rank {rank} for {name} is outside [1, {min(weight.shape)}]; the checkpoint's "
                "rank map is corrupt"
            )
        shell = LowRankLinear(
            linear.in_features,
            linear.out_features,
            int(rank),
            bias=linear.bias is not None,
            device="meta",
            dtype=weight.dtype,
        )
        if not weight.is_meta:
            shell = shell.to_empty(device=weight.device)
            with torch.no_grad():
                for param in shell.parameters():
                    param.zero_()
        _set_submodule(model, name, shell)
    return dict(rank_map)

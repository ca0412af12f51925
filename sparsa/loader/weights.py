"""Building a model from its HF config and filling it with checkpoint tensors: the rename
rules, fused shards and expert projections, and the completeness check."""

from __future__ import annotations

import re

import torch
from torch import nn

from sparsa.loader.safetensors_reader import CheckpointError
from sparsa.models.registry import resolve_architecture

# Applied after the model's own rename rules. (pattern, replacement, action): action None
# renames and goes on; an int loads one shard of a fused Linear; a str loads one expert
# projection ('gate' | 'up' | 'down') into a FusedExperts module.
_DEFAULT_RULES: list[tuple[str, str, int | str | None]] = [
    (r"^(.*)\.experts\.(\d+)\.(?:w1|gate_proj)\.weight$", r"\1.experts", "gate"),
    (r"^(.*)\.experts\.(\d+)\.(?:w3|up_proj)\.weight$", r"\1.experts", "up"),
    (r"^(.*)\.experts\.(\d+)\.(?:w2|down_proj)\.weight$", r"\1.experts", "down"),
    (r"^(.*)\.q_proj\.(weight|bias)$", r"\1.qkv_proj.\2", 0),
    (r"^(.*)\.k_proj\.(weight|bias)$", r"\1.qkv_proj.\2", 1),
    (r"^(.*)\.v_proj\.(weight|bias)$", r"\1.qkv_proj.\2", 2),
    (r"^(.*)\.gate_proj\.(weight|bias)$", r"\1.gate_up_proj.\2", 0),
    (r"^(.*)\.up_proj\.(weight|bias)$", r"\1.gate_up_proj.\2", 1),
]
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.rotary_emb\.|num_batches_tracked)")


def build_model(hf_config, dtype: torch.dtype, device: torch.device) -> nn.Module:
    cls = resolve_architecture(hf_config)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(hf_config)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def _apply_rule(name: str, rules) -> tuple[str, int | str | None, int | None]:
    for pattern, repl, action in rules:
        m = re.search(pattern, name)
        if not m:
            continue
        if action is None:
            name = re.sub(pattern, repl, name)
            continue
        expert = int(m.group(2)) if isinstance(action, str) else None
        return m.expand(repl), action, expert
    return name, None, None


def load_weights(model: nn.Module, weights, extra_rules=None,
                 expert_sink: dict | None = None, expected: set[str] | None = None) -> None:
    """Copy checkpoint tensors into the model; every parameter must be covered (`expected`:
    the entries to cover, when the model's modules no longer say it: `_expected_entries`
    of the model before its layers were swapped for quantized ones).

    With `expert_sink` (a dict; `weights` must then be a SafetensorsCheckpoint) routed-expert
    tensors are not read: their names go to expert_sink[(module name, expert, which)] for
    an offloaded expert store to fetch later."""
    rules = list(getattr(model, "weight_rules", [])) + list(extra_rules or []) + _DEFAULT_RULES
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    filled: set[str] = set()
    skip: set[str] = set()
    if expert_sink is not None:
        for ckpt_name in weights.names():
            if _IGNORED.search(ckpt_name):
                continue
            target, action, expert = _apply_rule(ckpt_name, rules)
            if isinstance(action, str):
                if target not in modules or not hasattr(modules[target], "load_expert"):
                    raise CheckpointError(
                        f"checkpoint tensor {ckpt_name!r} has no place in the model")
                expert_sink[(target, expert, action)] = ckpt_name
                filled.add(f"{target}.{action}.{expert}")
                skip.add(ckpt_name)
        weights = weights.tensors(skip)
    for ckpt_name, tensor in weights:
        if _IGNORED.search(ckpt_name):
            continue
        target, action, expert = _apply_rule(ckpt_name, rules)
        if not isinstance(tensor, torch.Tensor):  # blocks as a file holds them (Int4Rows...)
            owner = modules.get(target if isinstance(action, str) else target.rpartition(".")[0])
            if not hasattr(owner, "_stream"):  # only a quantized module being streamed
                tensor = tensor.dequantize(_param_dtype(params, target, owner))
        if isinstance(action, str):
            mod = modules.get(target)
            if mod is None or not hasattr(mod, "load_expert"):
                raise CheckpointError(f"checkpoint tensor {ckpt_name!r} has no place in the model")
            mod.load_expert(expert, action, tensor)
            filled.add(f"{target}.{action}.{expert}")
            continue
        mod_name, _, pname = target.rpartition(".")
        mod = modules.get(mod_name)
        if isinstance(action, int):
            if mod is None or not hasattr(mod, "load_shard"):
                raise CheckpointError(f"checkpoint tensor {ckpt_name!r} has no place in the model")
            mod.load_shard(pname, tensor, action)
            filled.add(f"{target}#{action}")
            continue
        if pname in ("weight", "bias") and hasattr(mod, "load_shard"):
            mod.load_shard(pname, tensor, None)
            filled.add(target)
            continue
        if target not in params:
            raise CheckpointError(
                f"checkpoint tensor {ckpt_name!r} has no place in the model "
                f"({type(model).__name__})"
            )
        param = params[target]
        if tuple(param.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"shape mismatch for {ckpt_name!r}: checkpoint {tuple(tensor.shape)}, "
                f"model {tuple(param.shape)}"
            )
        param.data.copy_(tensor)
        filled.add(target)
    _check_complete(filled, _expected_entries(model) if expected is None else expected)


def _param_dtype(params: dict, target: str, owner: nn.Module | None) -> torch.dtype:
    """The dtype the full-precision model holds `target` (or `owner`'s weights) in."""
    if target in params:
        return params[target].dtype
    p = next(owner.parameters(), None) if owner is not None else None
    return p.dtype if p is not None else torch.get_default_dtype()


def _expected_entries(model: nn.Module) -> set[str]:
    from sparsa.layers.linear import Linear
    from sparsa.layers.moe import FusedExperts

    expected: set[str] = set()
    covered: set[str] = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, FusedExperts):
            for e in range(mod.num_experts):
                for which in ("gate", "up", "down"):
                    expected.add(f"{mname}.{which}.{e}")
            covered |= {f"{mname}.w13", f"{mname}.w2"}
        elif isinstance(mod, Linear) and len(mod.output_sizes) > 1:
            for pname in ("weight", "bias"):
                if getattr(mod, pname) is not None:
                    for s in range(len(mod.output_sizes)):
                        expected.add(f"{mname}.{pname}#{s}")
                    covered.add(f"{mname}.{pname}")
    for pname, _ in model.named_parameters():  # tied weights appear once
        if pname not in covered:
            expected.add(pname)
    return expected


def _check_complete(filled: set[str], expected: set[str]) -> None:
    missing = sorted(expected - filled)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8
                                          else "")
        raise CheckpointError(f"checkpoint is missing tensors: {shown}")


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights from a seed; norms stay 1 so activations keep a sane scale."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
            continue
        # fill in chunks so a multi-GB tensor never needs an fp32 temporary of its own size
        flat = p.data.view(-1)
        step = 1 << 24
        for s in range(0, flat.numel(), step):
            chunk = torch.randn(min(step, flat.numel() - s), generator=gen) * std
            flat[s : s + chunk.numel()].copy_(chunk)


expected_entries = _expected_entries  # (public name for other loaders)

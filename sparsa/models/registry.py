"""Architecture registry keyed by the HF `architectures` name."""

from __future__ import annotations

import importlib

from torch import nn

# name -> (module, class); imported lazily so one broken family can't break the others
_REGISTRY: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("sparsa.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("sparsa.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("sparsa.models.llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("sparsa.models.llama", "Qwen3ForCausalLM"),
    "MixtralForCausalLM": ("sparsa.models.moe_models", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("sparsa.models.moe_models", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("sparsa.models.moe_models", "Qwen3MoeForCausalLM"),
    "OlmoeForCausalLM": ("sparsa.models.moe_models", "OlmoeForCausalLM"),
    "DeepseekV2ForCausalLM": ("sparsa.models.deepseek_v2", "DeepseekV2ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def resolve_architecture(hf_config) -> type[nn.Module]:
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        if arch in _REGISTRY:
            module, cls = _REGISTRY[arch]
            return getattr(importlib.import_module(module), cls)
    raise ValueError(
        f"unsupported architecture {archs or '(none given in config.json)'}; "
        f"supported: {', '.join(supported_architectures())}"
    )

"""Synthetic key lists shaped like real MoE adapters, shared by the benchmarks.

Example:
    >>> len(deepseek_v3_adapter_keys())
    90064
"""

from __future__ import annotations

DEEPSEEK_V3 = {"num_layers": 61, "first_k_dense": 3, "num_experts": 256}


def deepseek_v3_adapter_keys(
    *, num_layers: int = 61, first_k_dense: int = 3, num_experts: int = 256
) -> list[str]:
    """Per-expert LoRA keys of a DeepSeek-V3-shaped adapter (MLA attention, shared experts, router)."""
    keys: list[str] = []
    prefix = "base_model.model.model.layers"
    attention = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    for layer in range(num_layers):
        for module in attention:
            keys += [f"{prefix}.{layer}.self_attn.{module}.lora_{ab}.weight" for ab in "AB"]
        if layer < first_k_dense:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                keys += [f"{prefix}.{layer}.mlp.{proj}.lora_{ab}.weight" for ab in "AB"]
            continue
        for proj in ("gate_proj", "up_proj", "down_proj"):
            keys += [f"{prefix}.{layer}.mlp.shared_experts.{proj}.lora_{ab}.weight" for ab in "AB"]
        for expert in range(num_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                keys += [f"{prefix}.{layer}.mlp.experts.{expert}.{proj}.lora_{ab}.weight" for ab in "AB"]
    return keys

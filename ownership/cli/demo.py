"""`ownership demo`: the main job end to end on a small synthetic MoE LoRA adapter.

It writes a PEFT-style adapter (attention LoRA, router LoRA, 8 experts x 3 projections of per-expert LoRA, in
two layers) to a temporary folder, prints the whole-mesh plan at ep=4 as a table, then loads one rank's share
and compares bytes read with the adapter's size.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ownership.cli.render import print_table
from ownership.loading.loader import load
from ownership.loading.plan import MeshPlan
from ownership.ruleset import load_ruleset
from ownership.units import human_bytes

__all__ = ["run_demo", "write_demo_adapter"]


def write_demo_adapter(
    folder: Path,
    *,
    num_layers: int = 2,
    num_experts: int = 8,
    hidden: int = 256,
    inter: int = 512,
    r: int = 16,
) -> Path:
    """A PEFT adapter folder with per-expert LoRA keys (as made under transformers 4), seeded."""
    generator = torch.Generator().manual_seed(0)

    def pair(out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(r, inp, generator=generator), torch.randn(out, r, generator=generator)

    tensors: dict[str, torch.Tensor] = {}
    for layer in range(num_layers):
        base = f"base_model.model.model.layers.{layer}"
        modules = {
            f"{base}.self_attn.{p}": (hidden, hidden) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        }
        modules[f"{base}.mlp.gate"] = (num_experts, hidden)
        for e in range(num_experts):
            for proj, shape in (
                ("gate_proj", (inter, hidden)),
                ("up_proj", (inter, hidden)),
                ("down_proj", (hidden, inter)),
            ):
                modules[f"{base}.mlp.experts.{e}.{proj}"] = shape
        for module, (out, inp) in modules.items():
            tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = pair(out, inp)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "base_model_name_or_path": None,
        "target_modules": [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "num_experts": num_experts}))
    return folder


def run_demo(*, ep: int = 4, rank: int = 1) -> None:
    ruleset = load_ruleset("vllm-ep-lora")
    with tempfile.TemporaryDirectory(prefix="ownership-demo-") as tmp:
        folder = write_demo_adapter(Path(tmp) / "adapter")
        print(f"adapter: {folder} (8 experts, num_experts read from its config.json)")
        print(f"ruleset: {ruleset.name} ({ruleset.source}), mesh ep={ep}\n")
        plan = ruleset.plan(folder, mesh=f"ep={ep}")
        assert isinstance(plan, MeshPlan)
        rows = []
        for rank_plan in plan.ranks:
            experts = sorted({int(d.captures["expert"]) for d in rank_plan.owned if "expert" in d.captures})
            rows.append(
                [
                    str(rank_plan.rank),
                    str(len(rank_plan.owned)),
                    ",".join(map(str, experts)),
                    human_bytes(rank_plan.bytes_owned),
                    f"{100 * rank_plan.bytes_owned / plan.bytes_total:.1f}%",
                ]
            )
        print_table(["rank", "keys", "experts", "bytes", "share"], rows, align_right={1, 3, 4})
        result = load(ruleset, folder, mesh=f"ep={ep}", rank=rank)
        stats = result.stats
        print(
            f"\nloaded rank {rank}: {stats.num_tensors} tensors, read {human_bytes(stats.bytes_read)} of "
            f"{human_bytes(stats.bytes_total)} ({100 * stats.bytes_read / stats.bytes_total:.1f}%), "
            f"owned {human_bytes(stats.bytes_owned)}, skipped {human_bytes(stats.bytes_skipped)}, "
            f"{stats.seconds * 1000:.0f} ms"
        )
        example = next(d for d in result.plan.owned if "expert" in d.captures)
        print(f"e.g. {example.key} -> rule {example.rule}, expert {example.captures['expert']}")

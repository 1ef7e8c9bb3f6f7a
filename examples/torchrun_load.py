"""Load a MoE LoRA adapter at ep=4 under torchrun: each rank reads its experts only, then all ranks verify.

    torchrun --nproc-per-node 4 --master-addr 127.0.0.1 --master-port 29500 examples/torchrun_load.py \
        tests/fixtures/data/qwen3_moe/lora_fused --num-experts 6

Uses gloo on the CPU (nccl when CUDA is available, loading straight onto each rank's GPU) and prints what each
rank owns and read. With `--dtensor`, tensors that DTensor can hold come back as DTensors (replicated over ep
here: the experts stay local, with their global ids in `result.shards`).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from ownership import load_ruleset
from ownership.torch_distributed import load_distributed, mesh_from_process_group


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default="tests/fixtures/data/qwen3_moe/lora_fused")
    parser.add_argument("--ruleset", default="vllm-ep-lora")
    parser.add_argument("--mesh", default="ep=4")
    parser.add_argument("--num-experts", type=int, default=6)
    parser.add_argument("--dtensor", action="store_true", help="return DTensors where they fit")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        # all_gather_object under nccl stages objects on the current device.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        mesh = mesh_from_process_group(args.mesh)
        result = load_distributed(
            load_ruleset(args.ruleset),
            args.checkpoint,
            mesh=mesh,
            params={"num_experts": args.num_experts},
            device="cuda" if cuda else None,
            as_dtensor=args.dtensor,
        )
        stats = result.stats
        dtensors = sum(spec.is_dtensor for spec in result.shards.values())
        print(
            f"rank {dist.get_rank()} {mesh.coords(dist.get_rank())}: {stats.num_tensors} tensors, "
            f"{stats.bytes_owned:,} bytes owned, {stats.bytes_read:,} read of {stats.bytes_total:,}"
            + (f"; {dtensors} DTensors" if args.dtensor else ""),
            flush=True,
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

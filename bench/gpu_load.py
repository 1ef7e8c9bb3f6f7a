"""Loading onto GPUs: one rank's `load(..., device="cuda")` against its floors, then 1, 2 and 4 ranks under NCCL.

Makes a ~4 GB synthetic MoE checkpoint (bf16, per-expert keys, 4 safetensors shards with an index) on local
disk, flushes it and reads it once so that the page cache is warm, then:

1. On GPU 0, for rank 0 of ep=2, best of 3 each, in one process:
   - `raw`: `os.preadv` of exactly the owned byte ranges into a host buffer (touched beforehand);
   - `h2d`: one `copy_(non_blocking=True)` of that many bytes from pinned host memory to the GPU;
   - `ownership`: `ownership.loader.load(..., device="cuda")` end to end (headers, plan, reads, copies,
     synchronised), with its peak `torch.cuda.max_memory_allocated()`;
   - `host then .to`: `load(...)` to host memory, then each tensor `.to("cuda")` (for reference).
   Target: `ownership` >= 0.7 x min(raw, h2d) in owned bytes per second.
2. For 1, 2 and 4 GPUs (as many as there are), one process per GPU under NCCL: every rank loads its ep share
   with `load_distributed(..., device="cuda", verify=True)`; best of 2 (the first pays NCCL's set-up).
   Targets: per-rank peak `max_memory_allocated` <= 1.05 x owned + 64 MiB, verify passes, and the wall time
   falls as ranks are added. Then one `as_dtensor=True` load checks DTensors on the GPUs.

Prints the tables, and writes them with the command, card and driver to `--out` (`$OUT` when set):
`gpu_load.md` and `gpu_load.json`.

Run: `PYTHONPATH=. python bench/gpu_load.py [--dir /tmp/ownership-gpu] [--out DIR]`. Without CUDA it runs a tiny
smoke test on the CPU (gloo; no GPU figures): `--smoke`.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

GIB = 2**30
MIB = 2**20
SHARDS = 4
RULES = """
name = "bench-moe"
summary = "routed experts partitioned over ep; everything else on every rank"
axes = ["ep"]
default = "replicate"

[params.num_experts]

[[rule]]
id = "routed-expert"
match = "**.experts.<expert>.**"
place = { expert = { over = "ep", size = "num_experts" } }
"""


def sizes(smoke: bool) -> dict[str, int]:
    if smoke:
        return {"layers": 2, "experts": 8, "hidden": 64, "inter": 32, "vocab": 256}
    # 8 x 32 x 3 expert matrices of 2048 x 1152 bf16 (3.6 GB) + attention, embeddings: about 4.0 GB.
    return {"layers": 8, "experts": 32, "hidden": 2048, "inter": 1152, "vocab": 16384}


def make_checkpoint(folder: Path, shape: dict[str, int]) -> Path:
    """Sharded safetensors with an index; tensors are distinct slices of one random pool (fast to make)."""
    from safetensors.torch import save_file

    index = folder / "model.safetensors.index.json"
    if index.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    layers, experts, hidden, inter, vocab = (
        shape[k] for k in ("layers", "experts", "hidden", "inter", "vocab")
    )
    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for layer in range(layers):
        base = f"model.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors.append((f"{base}.self_attn.{proj}.weight", (hidden, hidden)))
        tensors.append((f"{base}.input_layernorm.weight", (hidden,)))
        tensors.append((f"{base}.mlp.gate.weight", (experts, hidden)))
        for e in range(experts):
            for proj, rows, cols in (
                ("gate_proj", inter, hidden),
                ("up_proj", inter, hidden),
                ("down_proj", hidden, inter),
            ):
                tensors.append((f"{base}.mlp.experts.{e}.{proj}.weight", (rows, cols)))
    tensors.append(("model.norm.weight", (hidden,)))
    tensors.append(("lm_head.weight", (vocab, hidden)))
    largest = max(torch.Size(s).numel() for _, s in tensors)
    generator = torch.Generator().manual_seed(0)
    pool = torch.randn(largest + 2**20, generator=generator).to(torch.bfloat16)
    total = sum(torch.Size(s).numel() * 2 for _, s in tensors)
    per_shard = total / SHARDS
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    number = 1

    def flush() -> None:
        nonlocal shard, shard_bytes, number
        name = f"model-{number:05d}-of-{SHARDS:05d}.safetensors"
        save_file(shard, str(folder / name))
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes, number = {}, 0, number + 1

    for i, (key, shape_) in enumerate(tensors):
        count = torch.Size(shape_).numel()
        start = int(torch.randint(0, pool.numel() - count + 1, (1,), generator=generator))
        shard[key] = pool[start : start + count].clone().view(shape_)
        shard_bytes += count * 2
        if shard_bytes >= per_shard and number < SHARDS and i < len(tensors) - 1:
            flush()
    flush()
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    os.sync()
    return folder


def warm(folder: Path) -> None:
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb", buffering=0) as handle:
            while handle.read(64 * MIB):
                pass


# -- part 1: one rank on one GPU --------------------------------------------------------------------------------


def owned_runs(
    ruleset: Any, folder: Path, *, mesh: str, rank: int, params: dict[str, Any]
) -> tuple[list[tuple[str, int, int]], int]:
    """(file, offset, length) of every owned tensor of the rank (all selections are whole tensors here)."""
    from ownership.formats import open_checkpoint
    from ownership.loading.plan import build_plan

    with open_checkpoint(folder) as checkpoint:
        plan = build_plan(ruleset.bind(mesh=mesh, params=params), checkpoint.entries(), rank=rank)
        runs = []
        for entry, decision in plan.owned_entries():
            assert decision.selection is None and entry.offset is not None
            runs.append((str(folder / entry.file), entry.offset, entry.nbytes))
    return runs, plan.bytes_owned


def time_raw(runs: list[tuple[str, int, int]], owned: int, repeats: int) -> float:
    buffer = torch.empty(owned, dtype=torch.uint8)
    buffer.fill_(1)  # touch every page before the clock starts
    view = memoryview(buffer.numpy())
    fds = {path: os.open(path, os.O_RDONLY) for path in {p for p, _, _ in runs}}
    best = float("inf")
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            position = 0
            for path, offset, length in runs:
                done = 0
                while done < length:
                    done += os.preadv(fds[path], [view[position + done : position + length]], offset + done)
                position += length
            best = min(best, time.perf_counter() - start)
    finally:
        for fd in fds.values():
            os.close(fd)
    return best


def time_h2d(owned: int, repeats: int) -> float:
    pinned = torch.empty(owned, dtype=torch.uint8, pin_memory=True)
    pinned.fill_(3)
    device = torch.empty(owned, dtype=torch.uint8, device="cuda")
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        device.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    del pinned, device
    torch.cuda.empty_cache()
    return best


def one_gpu(folder: Path, shape: dict[str, int], repeats: int) -> dict[str, Any]:
    from ownership import Ruleset
    from ownership.loading.loader import load
    from ownership.torch_distributed import checksums

    ruleset = Ruleset.from_text(RULES)
    params = {"num_experts": shape["experts"]}
    mesh, rank = "ep=2", 0
    runs, owned = owned_runs(ruleset, folder, mesh=mesh, rank=rank, params=params)
    raw = time_raw(runs, owned, repeats)
    h2d = time_h2d(owned, repeats)
    load_times, peaks = [], []
    result = None
    for _ in range(repeats):
        result = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        result = load(ruleset, folder, mesh=mesh, rank=rank, params=params, device="cuda")
        torch.cuda.synchronize()
        load_times.append(time.perf_counter() - start)
        peaks.append(torch.cuda.max_memory_allocated() - before)
    assert result is not None
    start = time.perf_counter()
    host = load(ruleset, folder, mesh=mesh, rank=rank, params=params)
    moved = {key: tensor.to("cuda") for key, tensor in host.tensors.items()}
    torch.cuda.synchronize()
    host_then_to = time.perf_counter() - start
    del moved
    # The GPU load is the host load, bit for bit (checksums taken on each device must agree, too).
    same = all(torch.equal(result.tensors[k].cpu(), t) for k, t in list(host.tensors.items())[:64])
    agree = checksums(list(result.tensors.values())) == checksums(list(host.tensors.values()))
    best = min(load_times)
    return {
        "mesh": mesh,
        "rank": rank,
        "owned": owned,
        "num_tensors": len(result.tensors),
        "raw_s": raw,
        "h2d_s": h2d,
        "ownership_s": best,
        "ownership_all_s": load_times,
        "host_then_to_s": host_then_to,
        "peak": max(peaks),
        **_ratio(raw, h2d, best),
        "equal_to_host_load": same,
        "checksums_agree_cpu_gpu": agree,
    }


def _ratio(raw_s: float, h2d_s: float, ownership_s: float) -> dict[str, Any]:
    """End-to-end rate over the slower floor's rate (rates of the same bytes: the slower floor takes longer)."""
    ratio = max(raw_s, h2d_s) / ownership_s
    return {"ratio": ratio, "ratio_held": ratio >= 0.7}


# -- part 2: 1, 2, 4 ranks under NCCL ---------------------------------------------------------------------------


def worker(rank: int, world: int, port: int, folder: str, experts: int, out: str, smoke: bool) -> None:
    import torch.distributed as dist

    from ownership import Ruleset
    from ownership.torch_distributed import IntegrityError, load_distributed

    cuda = torch.cuda.is_available() and not smoke
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
        **({"device_id": torch.device("cuda", rank)} if cuda else {}),
    )
    ruleset = Ruleset.from_text(RULES)
    params = {"num_experts": experts}
    device = "cuda" if cuda else None
    runs = []
    try:
        for _ in range(2):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() if cuda else 0
            dist.barrier()
            start = time.perf_counter()
            verified, problem = True, None
            try:
                result = load_distributed(ruleset, folder, mesh=f"ep={world}", params=params, device=device)
                owned = result.stats.bytes_owned
            except IntegrityError as error:
                verified, problem, owned, result = False, str(error), 0, None
            if cuda:
                torch.cuda.synchronize()
            own_s = time.perf_counter() - start
            dist.barrier()
            wall = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() - before if cuda else 0
            runs.append(
                {
                    "seconds": own_s,
                    "wall": wall,
                    "peak": peak,
                    "owned": owned,
                    "verified": verified,
                    "problem": problem,
                }
            )
            del result
        # DTensors on the GPUs: replicated keys become DTensor(Replicate()), experts stay local with their ids.
        result = load_distributed(
            ruleset, folder, mesh=f"ep={world}", params=params, device=device, as_dtensor=True, verify=False
        )
        from torch.distributed.tensor import DTensor

        num_dtensors = sum(isinstance(t, DTensor) for t in result.tensors.values())
        norm = result.tensors["model.norm.weight"]
        assert isinstance(norm, DTensor)
        full = norm.full_tensor().cpu()
        from safetensors import safe_open

        index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())
        with safe_open(str(Path(folder) / index["weight_map"]["model.norm.weight"]), "pt") as handle:
            expected = handle.get_tensor("model.norm.weight")
        expert_ids = sorted(
            {spec.ids["expert"][0] for spec in result.shards.values() if "expert" in spec.ids}
        )
        dtensor = {
            "num_dtensors": num_dtensors,
            "num_local": len(result.tensors) - num_dtensors,
            "norm_full_equal": bool(torch.equal(full, expected)),
            "expert_ids": expert_ids,
        }
        del result
        Path(out, f"world{world}.rank{rank}.json").write_text(json.dumps({"runs": runs, "dtensor": dtensor}))
    except Exception:
        Path(out, f"world{world}.rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def many_gpus(
    folder: Path, shape: dict[str, int], worlds: list[int], out: Path, smoke: bool
) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    rows = []
    for world in worlds:
        context = mp.start_processes(
            worker,
            args=(world, _free_port(), str(folder), shape["experts"], str(out), smoke),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + 180
        failure = None
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() > deadline:
                    failure = "timed out"
                    break
        except Exception as error:
            failure = str(error).splitlines()[0]
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        ranks = []
        for rank in range(world):
            path = out / f"world{world}.rank{rank}.json"
            error = out / f"world{world}.rank{rank}.error"
            if path.exists():
                ranks.append(json.loads(path.read_text()))
                path.unlink()
            elif error.exists():
                failure = failure or error.read_text().strip().splitlines()[-1]
        if failure or len(ranks) != world:
            rows.append({"world": world, "failure": failure or "missing results"})
            print(f"ep={world}: FAILED: {failure}", flush=True)
            continue
        best = min(range(2), key=lambda i: max(r["runs"][i]["wall"] for r in ranks))
        per_rank = [r["runs"][best] for r in ranks]
        rows.append(
            {
                "world": world,
                "wall": max(r["wall"] for r in per_rank),
                "walls": [max(r["runs"][i]["wall"] for r in ranks) for i in range(2)],
                "owned": [r["owned"] for r in per_rank],
                "peak": [r["peak"] for r in per_rank],
                "memory_held": all(r["peak"] <= 1.05 * r["owned"] + 64 * MIB for r in per_rank),
                "verified": all(r["verified"] for r in per_rank),
                "problems": [r["problem"] for r in per_rank if r["problem"]],
                "dtensor": [r["dtensor"] for r in ranks],
            }
        )
        print(f"ep={world}: wall {rows[-1]['wall']:.3f} s", flush=True)
    return rows


# -- report ------------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
    }
    if torch.cuda.is_available():
        info["card"] = torch.cuda.get_device_name(0)
        info["num_gpus"] = torch.cuda.device_count()
        try:
            info["driver"] = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                )
                .stdout.strip()
                .splitlines()[0]
            )
        except (OSError, IndexError, subprocess.SubprocessError):
            info["driver"] = "unknown"
    info["cpus"] = os.cpu_count()
    return info


def report(data: dict[str, Any]) -> str:
    lines = []
    m = data["machine"]
    lines.append(
        f"card: {m.get('card', 'none')} x {m.get('num_gpus', 0)}, driver {m.get('driver', '-')}, "
        f"torch {m['torch']} (CUDA {m['cuda']}), Python {m['python']}, {m['cpus']} CPUs"
    )
    c = data["checkpoint"]
    lines.append(
        f"checkpoint: {c['bytes'] / GIB:.2f} GiB bf16 in {SHARDS} safetensors shards, {c['layers']} layers x "
        f"{c['experts']} experts (per-expert keys, hidden {c['hidden']}, inter {c['inter']}), page cache warm"
    )
    lines.append(f"command: {data['command']}")
    if data.get("note"):
        lines.append(f"note: {data['note']}")
    one = data.get("one_gpu")
    if one:
        owned = one["owned"]
        lines.append("")
        lines.append(
            f"One rank (rank {one['rank']} of {one['mesh']}) on GPU 0: {owned / GIB:.2f} GiB owned in "
            f"{one['num_tensors']} tensors, best of {len(one['ownership_all_s'])}"
        )
        lines.append("")
        lines.append("| what | seconds | owned GB/s |")
        lines.append("|---|---:|---:|")
        for label, key in (
            ("raw read of the owned bytes into host memory (preadv, 1 thread)", "raw_s"),
            ("host-to-device copy of the owned bytes from pinned memory", "h2d_s"),
            ('ownership `load(..., device="cuda")`, end to end', "ownership_s"),
            ('`load(...)` to host, then `.to("cuda")` (reference)', "host_then_to_s"),
        ):
            lines.append(f"| {label} | {one[key]:.3f} | {owned / one[key] / 1e9:.2f} |")
        lines.append("")
        one.update(_ratio(one["raw_s"], one["h2d_s"], one["ownership_s"]))
        lines.append(
            f"end to end / min(raw, h2d), in owned bytes per second = {one['ratio']:.2f} (target >= 0.70: "
            f"{'held' if one['ratio_held'] else 'MISSED'}); peak GPU memory {one['peak'] / GIB:.3f} GiB for "
            f"{owned / GIB:.3f} GiB owned; equal to the host load: {one['equal_to_host_load']}; "
            f"checksums on GPU = on CPU: {one['checksums_agree_cpu_gpu']}"
        )
    rows = data.get("many_gpus", [])
    if rows:
        lines.append("")
        lines.append(
            'Every rank loads its ep share: `load_distributed(..., device="cuda", verify=True)`, one process per '
            "GPU under NCCL, best of 2 (wall: from a barrier to the last rank done)"
        )
        lines.append("")
        lines.append(
            "| ranks | owned per rank GiB | max_memory_allocated per rank GiB | <= 1.05 x owned + 64 MiB | "
            "verify | wall s | speed-up vs 1 rank |"
        )
        lines.append("|---:|---|---|---|---|---:|---:|")
        base = next((r["wall"] for r in rows if r.get("world") == 1 and "wall" in r), None)
        for r in rows:
            if "failure" in r:
                lines.append(f"| {r['world']} | FAILED: {r['failure']} | | | | | |")
                continue
            owned = ", ".join(f"{b / GIB:.3f}" for b in r["owned"])
            peak = ", ".join(f"{b / GIB:.3f}" for b in r["peak"])
            speed = f"{base / r['wall']:.2f}" if base else "-"
            lines.append(
                f"| {r['world']} | {owned} | {peak} | {'held' if r['memory_held'] else 'MISSED'} | "
                f"{'passed' if r['verified'] else 'FAILED'} | {r['wall']:.3f} | {speed} |"
            )
        walls = [r["wall"] for r in rows if "wall" in r]
        falls = all(b < a for a, b in itertools.pairwise(walls)) and len(walls) == len(rows)
        lines.append("")
        lines.append(f"wall time falls with the number of ranks: {'held' if falls else 'MISSED'}")
        for r in rows:
            for rank, d in enumerate(r.get("dtensor", [])):
                lines.append(
                    f"as_dtensor, {r['world']} ranks, rank {rank}: {d['num_dtensors']} DTensors (Replicate() on ep), "
                    f"{d['num_local']} local expert tensors, holding experts {d['expert_ids'][0]}.."
                    f"{d['expert_ids'][-1]}; full_tensor() of model.norm.weight equal: {d['norm_full_equal']}"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ownership-gpu"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench/results"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, CPU and gloo only: checks the script"
    )
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="only print and write the tables of a JSON"
    )
    args = parser.parse_args()
    if args.render:
        data = json.loads(args.render.read_text())
        text = report(data)  # derived figures (ratios, targets) are recomputed from the measured ones
        print(text)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_load.json").write_text(json.dumps(data, indent=1))
        (args.out / "gpu_load.md").write_text("# GPU load benchmark\n\n" + text + "\n")
        return
    smoke = args.smoke or not torch.cuda.is_available()
    shape = sizes(smoke)
    args.out.mkdir(parents=True, exist_ok=True)
    folder = args.dir / ("smoke" if smoke else "moe")
    started = time.perf_counter()
    make_checkpoint(folder, shape)
    warm(folder)
    total = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    print(f"checkpoint {total / GIB:.2f} GiB ready in {time.perf_counter() - started:.1f} s", flush=True)
    data: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "checkpoint": {"bytes": total, **shape},
    }
    if not smoke:
        try:
            data["one_gpu"] = one_gpu(folder, shape, args.repeats)
        except Exception:
            data["one_gpu_error"] = traceback.format_exc()
            print(data["one_gpu_error"], flush=True)
        torch.cuda.empty_cache()
        print(f"one GPU done at {time.perf_counter() - started:.1f} s", flush=True)
        (args.out / "gpu_load.json").write_text(json.dumps(data, indent=1))
    worlds = [w for w in (1, 2, 4) if smoke or w <= torch.cuda.device_count()]
    data["many_gpus"] = many_gpus(folder, shape, worlds, args.out, smoke)
    text = report(data)
    print(text, flush=True)
    (args.out / "gpu_load.json").write_text(json.dumps(data, indent=1))
    (args.out / "gpu_load.md").write_text("# GPU load benchmark\n\n" + text + "\n")
    print(
        f"done in {time.perf_counter() - started:.1f} s; wrote {args.out}/gpu_load.md and gpu_load.json",
        flush=True,
    )


if __name__ == "__main__":
    main()

"""Distributed loading: 4 CPU processes on the gloo backend, talking over 127.0.0.1 only.

One spawn of 4 processes (module-scoped: starting processes is most of the cost) runs every job in turn, and
each job writes what every rank saw to files the tests read back, so a failing rank shows its message instead
of a bare exit code; a spawn that outlives its deadline is killed and fails the tests.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from ownership import MeshError, Ruleset, load_ruleset
from ownership.formats import open_checkpoint
from ownership.loading.loader import load
from ownership.placement.mesh import Mesh
from ownership.placement.selection import dim_indices
from ownership.torch_distributed import (
    IntegrityError,
    load_distributed,
    mesh_from_device_mesh,
    mesh_from_env,
    mesh_from_process_group,
    summarize,
    verify_summaries,
)
from tests.conftest import FIXTURES

NUM_RANKS = 4
NUM_EXPERTS = 6
DEADLINE_S = 120.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, port: int, out: str, job: Callable[[int, Path], None]) -> None:
    # gloo would otherwise pick an interface from the host name; keep every socket on loopback.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=NUM_RANKS,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        job(rank, Path(out))
    finally:
        dist.destroy_process_group()


def _spawn(job: Callable[[int, Path], None], out: Path) -> None:
    """Run `job(rank, out)` on 4 processes; kill them all if the deadline passes."""
    context = mp.start_processes(
        _entry, args=(_free_port(), str(out), job), nprocs=NUM_RANKS, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the {NUM_RANKS}-process job did not finish within {DEADLINE_S:.0f} s")
    except mp.ProcessRaisedException as error:
        errors = "\n".join(path.read_text() for path in sorted(out.glob("*/rank*.error")))
        pytest.fail(f"a rank failed: {error}\n{errors}")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


def _every_job(rank: int, out: Path) -> None:
    """Each job in turn, on the one process group; a job that raises leaves its traceback for the tests."""
    for name, job in JOBS.items():
        folder = out / name
        folder.mkdir(exist_ok=True)
        try:
            job(rank, folder)
        except Exception:
            (folder / f"rank{rank}.error").write_text(traceback.format_exc())
            raise


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The folder of every job's outputs, after one 4-process run."""
    out = tmp_path_factory.mktemp("distributed")
    save_file(DTENSOR_TENSORS, str(out / "dtensor.safetensors"))
    _spawn(_every_job, out)
    yield out


def _original(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as checkpoint:
        return {entry.key: checkpoint.read(entry.key) for entry in checkpoint.entries()}


# -- jobs (module level: spawned processes import them) ------------------------------------------------------


def _load_job(rank: int, out: Path) -> None:
    ruleset = load_ruleset("vllm-ep-lora")
    for name in ("lora_per_expert", "lora_fused"):
        folder = FIXTURES / "qwen3_moe" / name
        mesh = mesh_from_process_group("ep=4")
        result = load_distributed(ruleset, folder, mesh=mesh, params={"num_experts": NUM_EXPERTS})
        pieces = {
            decision.local_key or decision.key: {
                "key": decision.key,
                "selection": decision.to_json()["selection"],
            }
            for decision in result.plan.owned
        }
        torch.save(result.tensors, out / f"{name}.rank{rank}.pt")
        (out / f"{name}.rank{rank}.json").write_text(
            json.dumps({"pieces": pieces, "bytes_owned": result.stats.bytes_owned})
        )


def _gap_job(rank: int, out: Path) -> None:
    # PR #42737's rule puts 6 experts on ep=4 as [0,2) [2,4) [2,3) [3,4): experts 4 and 5 on no rank.
    ruleset = load_ruleset("vllm-ep-lora")
    params = {"num_experts": NUM_EXPERTS, "expert_strategy": "vllm_contiguous"}
    try:
        load_distributed(ruleset, FIXTURES / "qwen3_moe" / "lora_fused", mesh="ep=4", params=params)
    except IntegrityError as error:
        (out / f"rank{rank}.txt").write_text(str(error))
    else:
        (out / f"rank{rank}.txt").write_text("no error")


def _failing_rank_job(rank: int, out: Path) -> None:
    # Rank 2 alone is handed a missing checkpoint: it raises its own error, the others name it; none hangs.
    folder = FIXTURES / "qwen3_moe" / ("no-such-adapter" if rank == 2 else "lora_fused")
    try:
        load_distributed(load_ruleset("vllm-ep-lora"), folder, mesh="ep=4", params={"num_experts": 6})
    except Exception as error:
        (out / f"rank{rank}.txt").write_text(f"{type(error).__name__}: {error}")


def _mesh_job(rank: int, out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    seen: dict[str, Any] = {"world": str(mesh_from_process_group({"pp": 2, "ep": 2}))}
    try:
        mesh_from_process_group("ep=3")
    except MeshError as error:
        seen["bad"] = str(error)
    try:
        load_distributed(load_ruleset("vllm-ep-lora"), FIXTURES / "qwen3_moe" / "lora_fused", mesh="ep=8")
    except MeshError as error:
        seen["load"] = str(error)
    device_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "ep"))
    mesh = mesh_from_device_mesh(device_mesh)
    seen["device_mesh"] = str(mesh)
    seen["coords_agree"] = mesh.coords(rank) == dict(
        zip(mesh.names, device_mesh.get_coordinate() or [], strict=True)
    )
    (out / f"rank{rank}.json").write_text(json.dumps(seen))


DTENSOR_RULES = """
name = "dtensor-demo"
axes = ["ep", "tp"]
default = "replicate"

[[rule]]
id = "expert"
match = "m.experts.<expert>.w"
layout = "inter hidden"
place = { expert = { over = "ep", size = 4 }, inter = { over = "tp", strategy = "shard" } }

[[rule]]
id = "fused"
match = "m.fused.w"
layout = "(expert r) hidden"
place = { expert = { over = "ep", size = 4 } }

[[rule]]
id = "fused-round-robin"
match = "m.fused_rr.w"
layout = "(expert r) hidden"
place = { expert = { over = "ep", size = 4, strategy = "round_robin" } }

[[rule]]
id = "fused-tp"
match = "m.fused_tp.w"
layout = "expert inter hidden"
place = { expert = { over = "ep", size = 4 }, hidden = { over = "tp", strategy = "shard" } }

[[rule]]
id = "embed"
match = "m.embed"
layout = "vocab hidden"
pin = { ep = "first" }
place = { vocab = { over = "tp", strategy = "shard", uneven = true } }

[[rule]]
id = "two-axes-one-dim"
match = "m.both"
layout = "(a b) hidden"
sizes = { a = 2 }
place = { a = { over = "ep", strategy = "shard" }, b = { over = "tp", strategy = "shard" } }
"""


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(6)
    shapes = {
        **{f"m.experts.{e}.w": (4, 6) for e in range(4)},
        "m.fused.w": (8, 6),
        "m.fused_rr.w": (8, 6),
        "m.fused_tp.w": (4, 3, 6),
        "m.embed": (7, 6),
        "m.both": (8, 6),
        "m.norm": (6,),
    }
    return {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}


DTENSOR_TENSORS = _tensors()


def _dtensor_job(rank: int, out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    ruleset = Ruleset.from_text(DTENSOR_RULES)
    checkpoint = out.parent / "dtensor.safetensors"
    seen: dict[str, Any] = {}
    # The DeviceMesh built from the ownership mesh; verify runs on the local tensors first.
    result = load_distributed(ruleset, checkpoint, mesh="ep=2,tp=2", as_dtensor=True)
    for decision in result.plan.owned:  # checkpoint order: every rank meets the collectives in one order
        key = decision.local_key or decision.key
        tensor, spec = result.tensors[key], result.shards[key]
        item: dict[str, Any] = {
            "ids": {name: list(ids) for name, ids in spec.ids.items()},
            "reason": spec.reason,
        }
        if isinstance(tensor, DTensor):
            item["mesh"] = list(tensor.device_mesh.mesh_dim_names or ())
            item["placements"] = [_placement(p) for p in tensor.placements]
            item["local_equal"] = torch.equal(
                tensor.to_local(), _local_part(decision.key, decision.selection)
            )
            item["full_equal"] = torch.equal(tensor.full_tensor(), DTENSOR_TENSORS[decision.key])
        else:
            item["local_equal"] = torch.equal(tensor, _local_part(decision.key, decision.selection))
        seen[key] = item
    # A DeviceMesh given as the mesh: the same placements.
    device_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ep", "tp"))
    again = load_distributed(ruleset, checkpoint, mesh=device_mesh, as_dtensor=True, verify=False)
    seen["again"] = {
        key: [_placement(p) for p in t.placements] if isinstance(t, DTensor) else None
        for key, t in again.tensors.items()
    }
    (out / f"rank{rank}.json").write_text(json.dumps(seen))


def _placement(placement: Any) -> str:
    """A torch placement in `ShardSpec` words (torch's own str() changes between versions)."""
    from torch.distributed.tensor import Replicate, Shard

    if isinstance(placement, Shard):
        return f"shard({placement.dim})"
    assert isinstance(placement, Replicate), placement
    return "replicate"


def _local_part(key: str, selection: Any) -> torch.Tensor:
    part = DTENSOR_TENSORS[key]
    for d, dim in enumerate(selection or ()):
        if dim is not None:
            part = part.index_select(d, torch.tensor(list(dim_indices(dim, part.shape[d]))))
    return part


JOBS: dict[str, Callable[[int, Path], None]] = {
    "load": _load_job,
    "gap": _gap_job,
    "failing": _failing_rank_job,
    "mesh": _mesh_job,
    "dtensor": _dtensor_job,
}


# -- tests -----------------------------------------------------------------------------------------------------


def test_every_rank_holds_its_slices_of_the_original(spawned: Path) -> None:
    tmp_path = spawned / "load"
    for name in ("lora_per_expert", "lora_fused"):
        original = _original(FIXTURES / "qwen3_moe" / name)
        covered = {key: torch.zeros(tensor.shape, dtype=torch.int32) for key, tensor in original.items()}
        for rank in range(NUM_RANKS):
            tensors = torch.load(tmp_path / f"{name}.rank{rank}.pt", weights_only=True)
            info = json.loads((tmp_path / f"{name}.rank{rank}.json").read_text())
            assert tensors.keys() == info["pieces"].keys()
            for local_key, piece in info["pieces"].items():
                full = original[piece["key"]]
                index: tuple[Any, ...] = ()
                if piece["selection"] is not None:
                    index = tuple(
                        slice(None)
                        if dim is None
                        else torch.tensor(list(dim_indices(tuple(tuple(r) for r in dim), size)))
                        for dim, size in zip(piece["selection"], full.shape, strict=True)
                    )
                expected = full[_outer(index)] if index else full
                assert torch.equal(tensors[local_key], expected), (name, rank, local_key)
                if index:
                    covered[piece["key"]][_outer(index)] += 1
                else:
                    covered[piece["key"]] += 1
        assert all(bool((count >= 1).all()) for count in covered.values())


def _outer(index: tuple[Any, ...]) -> tuple[Any, ...]:
    """Index tensors per dim as an outer product (as the selection means), not zipped."""
    tensors = [i for i in index if isinstance(i, torch.Tensor)]
    if len(tensors) <= 1:
        return index
    out: list[Any] = []
    num_dims = len(index)
    for d, i in enumerate(index):
        if isinstance(i, torch.Tensor):
            shape = [1] * num_dims
            shape[d] = -1
            out.append(i.view(shape))
        else:
            out.append(slice(None))
    return tuple(out)


def test_verify_fails_on_every_rank_for_a_gap(spawned: Path) -> None:
    tmp_path = spawned / "gap"
    messages = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(NUM_RANKS)]
    assert len(set(messages)) == 1
    lines = messages[0].splitlines()
    assert lines[0] == (
        "ruleset 'vllm-ep-lora' on mesh ep=4: the ranks' loads do not make up the checkpoint "
        "(ranks 0-3 checked): 8 problems. Fix: run `ownership lint vllm-ep-lora CHECKPOINT --mesh ep=4` "
        "with the same params to see the rules"
    )
    prefix = "  key 'base_model.model.model.layers.0.mlp.experts"
    assert lines[1:3] == [
        f"{prefix}.base_layer.lora_A.weight' (rule 'fused-expert-lora-a'): rows 16..23 of dim 0 are owned by no rank",
        f"{prefix}.base_layer.lora_B.weight' (rule 'fused-expert-lora-b'): "
        "columns 4..5, 10..11, 16..17, 22..23 of dim 1 are owned by no rank",
    ]
    assert len(lines) == 9


def test_a_rank_that_cannot_load_fails_every_rank(spawned: Path) -> None:
    tmp_path = spawned / "failing"
    messages = {rank: (tmp_path / f"rank{rank}.txt").read_text() for rank in range(NUM_RANKS)}
    assert messages[2].startswith("CheckpointError: ")
    assert "no-such-adapter: no such checkpoint" in messages[2]
    for rank in (0, 1, 3):
        assert messages[rank].startswith(
            "IntegrityError: ruleset 'vllm-ep-lora' on mesh ep=4: the ranks' loads do not make up the "
            "checkpoint (ranks 0-3 checked): 1 problem."
        )
        assert "\n  rank 2 could not load its share: CheckpointError: " in messages[rank]


def test_meshes_from_the_process_group_and_device_mesh(spawned: Path) -> None:
    tmp_path = spawned / "mesh"
    for rank in range(NUM_RANKS):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen == {
            "world": "pp=2,ep=2",
            "bad": "mesh ep=3 has 3 ranks but the process group has 4: found 3 = ep=3, expected 4. "
            "Fix: declare axes whose sizes multiply to 4, or launch 3 processes",
            "load": "mesh ep=8 has 8 ranks but the process group has 4: found 8 = ep=8, expected 4. "
            "Fix: declare axes whose sizes multiply to 4, or launch 8 processes",
            "device_mesh": "pp=2,ep=2",
            "coords_agree": True,
        }


def test_mesh_errors_without_a_process_group() -> None:
    with pytest.raises(MeshError, match=r"^no torch.distributed process group is initialised\. Fix: "):
        mesh_from_process_group("ep=4")
    with pytest.raises(MeshError) as error:
        mesh_from_env("ep=2", env={"RANK": "0"})
    assert str(error.value) == (
        "environment variable WORLD_SIZE is unset: expected a non-negative integer. "
        "Fix: launch with torchrun, or set RANK and WORLD_SIZE"
    )
    with pytest.raises(MeshError) as error:
        mesh_from_env("ep=2", env={"RANK": "2", "WORLD_SIZE": "2"})
    assert str(error.value) == (
        "RANK=2 is outside WORLD_SIZE=2: expected 0..1. Fix: check the launcher's RANK and WORLD_SIZE"
    )
    assert mesh_from_env({"ep": 4}, env={"RANK": "3", "WORLD_SIZE": "4"}) == Mesh.parse("ep=4")


def test_replicas_with_different_bytes_are_named() -> None:
    ruleset = load_ruleset("vllm-ep-lora")
    folder = FIXTURES / "qwen3_moe" / "lora_per_expert"
    results = [
        load(ruleset, folder, mesh="ep=4", rank=rank, params={"num_experts": NUM_EXPERTS})
        for rank in range(NUM_RANKS)
    ]
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    results[3].tensors[key] = results[3].tensors[key] + 1
    summaries = [summarize(result, mesh="ep=4") for result in results]
    problems = verify_summaries(summaries, ruleset=ruleset, entries=results[0].plan.entries)
    assert len(problems) == 1
    assert problems[0].startswith(
        f"key {key!r} (rule '<default>'): the whole tensor differs between its replicas (checksums ranks 0-2: "
    )
    assert "; rank 3: " in problems[0]


def test_ranks_that_saw_different_inputs_are_named() -> None:
    ruleset = load_ruleset("vllm-ep-lora")
    results = [
        load(
            ruleset,
            FIXTURES / "qwen3_moe" / ("lora_fused" if rank < 3 else "lora_per_expert"),
            mesh="ep=4",
            rank=rank,
            params={"num_experts": NUM_EXPERTS},
        )
        for rank in range(NUM_RANKS)
    ]
    summaries = [summarize(result, mesh="ep=4") for result in results]
    problems = verify_summaries(summaries, ruleset=ruleset, entries=results[0].plan.entries)
    assert [p.split(" had ")[0] for p in problems] == [
        "ranks disagree on what they loaded: ranks 0-2",
        "ranks disagree on what they loaded: rank 3",
    ]


@pytest.mark.parametrize("name", ["lora_per_expert", "lora_fused"])
def test_sound_loads_verify_without_a_process_group(name: str) -> None:
    ruleset = load_ruleset("vllm-ep-lora")
    results = [
        load(ruleset, FIXTURES / "qwen3_moe" / name, mesh="ep=4", rank=rank, params={"num_experts": 6})
        for rank in range(NUM_RANKS)
    ]
    summaries = [summarize(result, mesh="ep=4") for result in results]
    assert verify_summaries(summaries, ruleset=ruleset, entries=results[0].plan.entries) == []


def test_dtensors_for_what_dtensor_can_hold_and_global_ids_for_the_rest(spawned: Path) -> None:
    shard0, shard2, replicate = "shard(0)", "shard(2)", "replicate"
    for rank in range(NUM_RANKS):
        ep, tp = divmod(rank, 2)
        seen = json.loads((spawned / "dtensor" / f"rank{rank}.json").read_text())
        again = seen.pop("again")
        experts = [2 * ep, 2 * ep + 1]

        def dtensor(mesh: list[str], placements: list[str], ids: dict[str, list[int]]) -> dict[str, Any]:
            return {
                "mesh": mesh,
                "placements": placements,
                "ids": ids,
                "reason": None,
                "local_equal": True,
                "full_equal": True,
            }

        def local(reason: str, ids: dict[str, list[int]]) -> dict[str, Any]:
            return {"ids": ids, "reason": reason, "local_equal": True}

        expected = {
            **{
                f"m.experts.{e}.w": dtensor(["tp"], [shard0], {"expert": [e], "inter": [2 * tp, 2 * tp + 1]})
                for e in experts
            },
            "m.fused.w": dtensor(["ep", "tp"], [shard0, replicate], {"expert": experts}),
            "m.fused_rr.w": local("its selection is strided or not contiguous", {"expert": [ep, ep + 2]}),
            "m.fused_tp.w": dtensor(
                ["ep", "tp"],
                [shard0, shard2],
                {"expert": experts, "hidden": [3 * tp, 3 * tp + 1, 3 * tp + 2]},
            ),
            **(
                {"m.embed": dtensor(["tp"], [shard0], {"vocab": [0, 1, 2, 3] if tp == 0 else [4, 5, 6]})}
                if ep == 0
                else {}
            ),
            "m.both": local("two mesh axes shard the same dim", {"a": [ep], "b": [2 * tp, 2 * tp + 1]}),
            "m.norm": dtensor(["ep", "tp"], [replicate, replicate], {}),
        }
        assert seen == expected, rank
        assert again == {key: item.get("placements") for key, item in expected.items()}

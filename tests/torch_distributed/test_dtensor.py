"""ShardSpecs: which local tensors DTensor can hold, with which placements, and the global ids of the rest.

The specs are pure (no process group); the 4-process gloo test in test_distributed.py builds the DTensors and
checks `full_tensor()` against the original.
"""

from __future__ import annotations

from typing import Any

import pytest

from ownership import Ruleset
from ownership.loading.entries import KeyEntry
from ownership.loading.plan import build_plan
from ownership.torch_distributed.dtensor import Replicate, Shard, ShardSpec, shard_specs

RULES = Ruleset.from_text(
    """
name = "sharding-demo"
axes = ["pp", "ep", "tp"]
default = "replicate"

[params.num_kv_heads]
default = 2

[[rule]]
id = "vocab"
match = "m.embed"
layout = "vocab hidden"
pin = { pp = "first" }
place = { vocab = { over = "tp", strategy = "shard", uneven = true } }

[[rule]]
id = "kv"
match = "m.k_proj"
layout = "out hidden"
place = { out = { over = "tp", strategy = "shard", parts = ["num_kv_heads*4"], heads = ["num_kv_heads"] } }

[[rule]]
id = "expert"
match = "m.experts.<expert>.w"
place = { expert = { over = "ep", size = 4 } }
""",
    source="sharding-demo.toml",
)


def _specs(mesh: str, entries: list[KeyEntry], **params: Any) -> list[dict[str, ShardSpec]]:
    bound = RULES.bind(mesh=mesh, params=params)
    return [shard_specs(build_plan(bound, entries, rank=rank), bound=bound) for rank in bound.mesh.ranks()]


@pytest.mark.parametrize(
    ("vocab", "dtensor"),
    [
        (8, True),
        (10, False),
        (9, False),
        (7, True),
    ],  # linear 3,3,2,2 / 3,2,2,2 are not torch.chunk's 3,3,3,1 / 3,3,3
)
def test_uneven_shards_are_dtensors_only_where_they_are_torch_chunks(vocab: int, dtensor: bool) -> None:
    mesh = "tp=4" if vocab != 7 else "tp=2"
    for specs in _specs(mesh, [KeyEntry("m.embed", "F32", (vocab, 4))]):
        spec = specs["m.embed"]
        assert spec.global_shape == (vocab, 4)
        if dtensor:
            assert (spec.axes, spec.placements, spec.reason) == (("tp",), (Shard(0),), None)
        else:
            assert spec.axes == ()
            assert spec.reason == "its parts are not torch.chunk's contiguous chunks in coordinate order"


def test_replicated_kv_heads_stay_local_with_their_rows() -> None:
    # tp=4 over 2 kv heads: coordinates 0 and 1 hold head 0 (rows 0..3), 2 and 3 hold head 1.
    specs = _specs("tp=4", [KeyEntry("m.k_proj", "F32", (8, 16))])
    for rank, spec in enumerate(s["m.k_proj"] for s in specs):
        assert spec.axes == ()
        assert spec.reason == "its parts are not torch.chunk's contiguous chunks in coordinate order"
        head = rank // 2
        assert dict(spec.ids) == {"out": tuple(range(4 * head, 4 * head + 4))}


def test_pinned_and_partitioned_axes_are_left_out_of_the_dtensor_mesh() -> None:
    entries = [
        KeyEntry("m.embed", "BF16", (8, 4)),
        KeyEntry("m.experts.3.w", "BF16", (4, 4)),
        KeyEntry("m.norm", "BF16", (4,)),
    ]
    specs = _specs("pp=2,ep=2,tp=2", entries)
    for rank, by_key in enumerate(specs):
        pp, ep, tp = rank // 4, rank // 2 % 2, rank % 2
        assert (pp == 0) == ("m.embed" in by_key)
        assert (ep == 1) == ("m.experts.3.w" in by_key)
        if pp == 0:
            embed = by_key["m.embed"]
            assert (embed.axes, embed.placements) == (("ep", "tp"), (Replicate(), Shard(0)))
            assert dict(embed.ids) == {"vocab": tuple(range(4 * tp, 4 * tp + 4))}
        if ep == 1:
            expert = by_key["m.experts.3.w"]
            assert (expert.axes, expert.placements) == (("pp", "tp"), (Replicate(), Replicate()))
            assert dict(expert.ids) == {"expert": (3,)}
        assert by_key["m.norm"].placements == (Replicate(),) * 3


def test_keys_held_by_some_coordinates_of_every_axis_stay_local() -> None:
    for rank, specs in enumerate(_specs("ep=4", [KeyEntry("m.experts.2.w", "F32", (4, 4))])):
        if rank != 2:
            assert specs == {}
            continue
        assert specs["m.experts.2.w"] == ShardSpec(
            "m.experts.2.w",
            (4, 4),
            ids={"expert": (2,)},
            reason="no mesh axis holds it as one tensor: it is partitioned or pinned on every axis",
        )
        assert not specs["m.experts.2.w"].is_dtensor


def test_keys_without_a_shape_stay_local() -> None:
    (specs,) = _specs("tp=1", [KeyEntry("m.norm")])
    assert specs["m.norm"] == ShardSpec("m.norm", (), reason="its shape is unknown")

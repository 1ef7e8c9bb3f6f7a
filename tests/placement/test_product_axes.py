"""Product axes: an index placed over an ordered product of mesh axes (`ep=dp*tp`, or `over = ["dp", "tp"]`),
flattened row-major as vLLM flattens its expert-parallel group (`ep_rank = dp_rank * tp + tp_rank`)."""

from __future__ import annotations

import pytest

from ownership import MeshError, Ruleset, load_ruleset
from ownership.placement.mesh import Mesh
from tests.conftest import FIXTURES


def test_a_product_axis_flattens_row_major() -> None:
    mesh = Mesh.parse("pp=2,dp=2,pcp=1,tp=2,ep=dp*pcp*tp")
    assert mesh.num_ranks == 8 and mesh.size("ep") == 4
    for rank in range(8):
        coords = mesh.coords(rank)
        assert mesh.coord(coords, "ep") == coords["dp"] * 1 * 2 + coords["pcp"] * 2 + coords["tp"]
    assert str(mesh) == "pp=2,dp=2,pcp=1,tp=2,ep=dp*pcp*tp"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dp=2,ep=dp*tp", "axis 'ep' is a product of axes the mesh does not declare"),
        ("dp=2,tp=2,tp=dp*tp", "axis 'tp' is declared twice"),
        ("dp=2,tp=2,ep=dp*dp", "or of one axis twice"),
    ],
)
def test_a_product_of_what_the_mesh_lacks_is_refused(text: str, message: str) -> None:
    with pytest.raises(MeshError, match=message):
        Mesh.parse(text)


def test_vllm_expert_parallelism_spreads_whole_experts_over_dp_and_tp() -> None:
    """`--mesh dp=2,tp=2,ep=dp*tp` is vLLM's --enable-expert-parallel: 6 experts over the 4 ranks (2, 2, 1, 1,
    determine_expert_map's linear split), each whole on its rank (the tp cut of their intermediate dim is not
    made: tp is part of ep), while attention stays tensor-parallel within each dp group."""
    bound = load_ruleset("transformers-moe").bind(
        mesh="dp=2,tp=2,ep=dp*tp",
        config={"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 6},
    )
    owners = {
        e: [
            (r, d.selection)
            for r, d in bound.owners(f"model.layers.1.mlp.experts.{e}.gate_proj.weight", (24, 32))
        ]
        for e in range(6)
    }
    assert owners == {
        0: [(0, None)],
        1: [(0, None)],
        2: [(1, None)],
        3: [(1, None)],
        4: [(2, None)],
        5: [(3, None)],
    }
    q = [(r, d.selection) for r, d in bound.owners("model.layers.1.self_attn.q_proj.weight", (32, 32))]
    assert q == [
        (0, (((0, 16, 1),), None)),
        (1, (((16, 32, 1),), None)),
        (2, (((0, 16, 1),), None)),
        (3, (((16, 32, 1),), None)),
    ]


def test_a_rule_may_place_over_a_product_directly() -> None:
    text = (
        'name = "t"\naxes = ["dp", "tp"]\ndefault = "replicate"\n[params.num_experts]\ndefault = 8\n[[rule]]\n'
        'id = "e"\nmatch = "**.experts.<expert>.**"\nplace = { expert = { over = ["dp", "tp"], size = "num_experts", '
        'strategy = "round_robin" } }\n'
    )
    bound = Ruleset.from_text(text).bind(mesh="dp=2,tp=2")
    assert [r for r, _ in bound.owners("m.experts.5.w")] == [1]  # 5 % 4 = 1: dp 0, tp 1
    with pytest.raises(Exception, match="indices 'expert' and 'x' are both placed on axis 'tp'"):
        Ruleset.from_text(
            text.replace(
                'strategy = "round_robin" } }', 'strategy = "round_robin" }, x = { over = "tp", size = 2 } }'
            ).replace("<expert>.**", "<expert>.<x>.**")
        )


def test_lint_is_clean_on_a_real_checkpoint_under_vllm_expert_parallelism() -> None:
    from ownership.lint import lint

    report = lint("auto", FIXTURES / "qwen3_moe" / "base", mesh="pp=2,dp=2,tp=2,ep=dp*tp")
    assert report.exit_code == 0 and [f.check for f in report.findings if f.level != "info"] == []

"""The `ownership` command line: explain, plan, load, lint and test rulesets; tables for people, JSON for machines.

Exit status: 0 on success, 1 when a check finds problems (lint, test), 2 on unusable input (the message names
the file, rule, key and fix).

Example:
    $ ownership explain vllm-ep-lora base_model.model.model.layers.0.mlp.experts.70.up_proj.lora_A.weight \\
        --mesh ep=4 --param num_experts=128
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ownership.builtin import builtin_names
from ownership.cases import add_test_command
from ownership.decision import DEFAULT_RULE, Decision
from ownership.errors import OwnershipError
from ownership.params import coerce_param
from ownership.plan import EntryLike, MeshPlan, Plan, entry_nbytes, read_keys_file
from ownership.render import human_bytes, print_json, print_table, selection_text
from ownership.ruleset import Ruleset, detect_ruleset, load_ruleset, merge_configs, rule_file, to_mesh
from ownership.spec import load_ruleset_spec, ruleset_json_schema

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except OwnershipError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


_RULESET_HELP = (
    "built-in ruleset name, a model_type, a rule file path, or `auto` (from the checkpoint's config.json); "
    "may be left out when a checkpoint is given"
)
_CONFIG_HELP = "the base model's config.json, for params and model_type (adapters carry none)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ownership",
        description="Decide from declarative rules which part of a checkpoint each rank owns, and load exactly that.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    explain = commands.add_parser("explain", help="which rule decides a key, and who owns what of it")
    explain.add_argument("ruleset", help="built-in ruleset name or rule file path")
    explain.add_argument("key", help="tensor name")
    explain.add_argument(
        "--shape", type=_shape, help="tensor shape, e.g. 24,32 (needed by rules with a layout)"
    )
    explain.add_argument("--rank", type=int, help="only this rank (default: every rank)")
    _common(explain)
    explain.set_defaults(handler=_explain)

    plan = commands.add_parser("plan", help="what each rank owns of a checkpoint or key list")
    plan.add_argument("ruleset", help=_RULESET_HELP)
    plan.add_argument("checkpoint", nargs="?", help="checkpoint file or folder")
    plan.add_argument(
        "--keys", type=Path, help="key list: one key a line, optionally key<TAB>dtype<TAB>[shape]"
    )
    which = plan.add_mutually_exclusive_group(required=True)
    which.add_argument("--rank", type=int, help="one rank")
    which.add_argument("--all-ranks", action="store_true", help="every rank of the mesh")
    _common(plan)
    plan.set_defaults(handler=_plan)

    rules = commands.add_parser("rules", help="built-in rulesets")
    rules_commands = rules.add_subparsers(metavar="ACTION")
    rules_list = rules_commands.add_parser("list", help="list the built-in rulesets")
    rules_list.add_argument("--format", choices=("table", "json"), default="table")
    rules_list.set_defaults(handler=_rules_list)
    rules_show = rules_commands.add_parser("show", help="print a ruleset's file")
    rules_show.add_argument("name", help="built-in ruleset name or rule file path")
    rules_show.set_defaults(handler=_rules_show)

    load = commands.add_parser("load", help="read one rank's share of a checkpoint into a safetensors file")
    load.add_argument("ruleset", help=_RULESET_HELP)
    load.add_argument("checkpoint", nargs="?", help="checkpoint file or folder")
    load.add_argument("--rank", type=int, required=True, help="the rank to load")
    load.add_argument("--out", type=Path, required=True, help="output .safetensors file (written atomically)")
    load.add_argument("--dtype", help="cast floating-point tensors, e.g. bfloat16")
    _common(load)
    load.set_defaults(handler=_load)

    lint = commands.add_parser(
        "lint", help="prove a ruleset against a checkpoint and a mesh (exit 1 on errors)"
    )
    lint.add_argument("ruleset", help=_RULESET_HELP)
    lint.add_argument("checkpoint", nargs="?", help="checkpoint file or folder (headers only are read)")
    lint.add_argument(
        "--keys", type=Path, help="key list: one key a line, optionally key<TAB>dtype<TAB>[shape]"
    )
    lint.add_argument("--mesh", required=True, help="mesh axes in rank order, e.g. pp=2,ep=4")
    lint.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a ruleset param")
    lint.add_argument("--config", type=Path, help=_CONFIG_HELP)
    lint.add_argument("--format", choices=("text", "json", "sarif"), default="text")
    lint.set_defaults(handler=_lint)

    add_test_command(commands)

    schema = commands.add_parser("schema", help="print the JSON Schema of rule files")
    schema.set_defaults(handler=_schema)

    demo = commands.add_parser("demo", help="plan and load a synthetic MoE LoRA adapter at ep=4")
    demo.add_argument("--ep", type=int, default=4, help="expert-parallel size")
    demo.add_argument("--rank", type=int, default=1, help="the rank to load")
    demo.set_defaults(handler=_demo)

    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mesh", required=True, help="mesh axes in rank order, e.g. pp=2,ep=4")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a ruleset param (repeatable), e.g. num_experts=128; JSON values allowed",
    )
    parser.add_argument("--config", type=Path, help=_CONFIG_HELP)
    parser.add_argument("--format", choices=("table", "json"), default="table")


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.strip("[]() ").split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not a comma-separated list of ints") from None


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """`NAME=VALUE` items to a dict; values parse as JSON where they can."""
    params: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise OwnershipError(
                f"cannot read --param {item!r}",
                expected="NAME=VALUE",
                fix="write e.g. --param num_experts=128",
            )
        params[name.strip()] = coerce_param(value.strip())
    return params


def _explain(args: argparse.Namespace) -> int:
    ruleset = load_ruleset(args.ruleset)
    mesh = to_mesh(args.mesh)
    bound = ruleset.bind(mesh=mesh, params=parse_params(args.param))
    owners = bound.owners(args.key, args.shape)
    match = bound.match(args.key)
    rule = bound.by_group[match.lastgroup].id if match is not None else None
    captures = bound.by_group[match.lastgroup].rule.captures(match) if match is not None else {}
    if args.rank is not None:
        mesh.coords(args.rank)
        owners = [(rank, d) for rank, d in owners if rank == args.rank]
    result = {
        "key": args.key,
        "shape": list(args.shape) if args.shape else None,
        "rule": rule if rule is not None else DEFAULT_RULE,
        "default": ruleset.spec.default,
        "captures": captures,
        "mesh": dict(mesh.axes),
        "owners": [
            {"rank": rank, "coords": mesh.coords(rank), **decision.to_json()} for rank, decision in owners
        ],
    }
    if args.format == "json":
        print_json(result)
        return 0
    print(f"key      {args.key}")
    print(f"rule     {result['rule']}" + ("" if rule else f" ({ruleset.spec.default})"))
    if captures:
        print("captures " + ", ".join(f"{k}={v}" for k, v in captures.items()))
    num_owners = len(owners)
    scope = f"rank {args.rank}" if args.rank is not None else f"{mesh.num_ranks} ranks of {mesh}"
    print(f"owners   {num_owners} of {scope}" + ("" if owners else " (nobody loads it)"))
    print_table(
        ["rank", "coords", "local key", "selection"],
        [
            [str(rank), _coords(mesh.coords(rank)), d.local_key or "", selection_text(d.selection)]
            for rank, d in owners
        ],
    )
    return 0


def _ruleset_args(args: argparse.Namespace) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """The ruleset's name or path (picked from the checkpoint's model_type for `auto`), the params given and the
    --config file's contents.

    `ownership plan CKPT ...` (one positional that is a checkpoint) means `auto`.
    """
    if args.checkpoint is None and getattr(args, "keys", None) is None and _is_checkpoint(args.ruleset):
        args.checkpoint, args.ruleset = args.ruleset, "auto"
    config = _read_config(args.config) if args.config is not None else None
    name = args.ruleset
    if name == "auto":
        merged = merge_configs(_checkpoint_config(args.checkpoint), config)
        # Built-in rulesets are named after their files.
        name = detect_ruleset(merged, source=args.checkpoint or "the checkpoint").name
    return name, parse_params(args.param), config


def _is_checkpoint(text: str) -> bool:
    path = Path(text)
    return path.is_dir() or (
        path.is_file() and path.suffix in (".safetensors", ".bin", ".pt", ".pth", ".json")
    )


def _checkpoint_config(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    from ownership.formats import open_checkpoint

    with open_checkpoint(path) as checkpoint:
        return dict(checkpoint.config) if checkpoint.config else None


def _read_config(path: Path) -> dict[str, Any]:
    from ownership.formats.detect import read_json_object

    return read_json_object(
        path,
        what="the config file",
        expected="a config.json (a JSON object)",
        fix="point --config at the base model's config.json",
    )


def _entries(args: argparse.Namespace) -> tuple[Any, str]:
    if args.keys is not None and args.checkpoint is not None:
        raise OwnershipError("give a checkpoint or --keys, not both", fix="drop one of them")
    if args.keys is not None:
        try:
            lines = args.keys.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise OwnershipError(
                "cannot read the key list", source=str(args.keys), found=error.strerror
            ) from None
        return read_keys_file(lines, source=str(args.keys)), str(args.keys)
    if args.checkpoint is None:
        raise OwnershipError("nothing to plan", fix="give a checkpoint path or --keys FILE")
    return args.checkpoint, args.checkpoint


def _plan(args: argparse.Namespace) -> int:
    ruleset_name, params, config = _ruleset_args(args)
    ruleset = load_ruleset(ruleset_name)
    source, name = _entries(args)
    result = ruleset.plan(
        source, mesh=args.mesh, rank=None if args.all_ranks else args.rank, params=params, config=config
    )
    if args.format == "json":
        print_json(_plan_json(result, ruleset, mesh=args.mesh))
        return 0
    if isinstance(result, MeshPlan):
        _print_mesh_plan(result, name)
    else:
        _print_rank_plan(result, name)
    return 0


def _plan_json(result: Plan | MeshPlan, ruleset: Ruleset, *, mesh: str) -> dict[str, Any]:
    if isinstance(result, MeshPlan):
        return result.to_json()
    return {
        "ruleset": ruleset.name,
        "mesh": dict(to_mesh(mesh).axes),
        "params": result.params,
        "bytes_total": result.bytes_total,
        "ranks": [result.to_json()],
    }


def _print_rank_plan(plan: Plan, name: str) -> None:
    rows = []
    for entry, decision in plan.owned_entries():
        rows.append(_owned_row(entry, decision))
    print(
        f"{name}: rank {plan.rank} ({_coords(plan.coords)}) owns {len(plan.owned)} of {len(plan.entries)} keys"
    )
    print_table(["key", "local key", "rule", "selection", "bytes"], rows, align_right={4})
    total = plan.bytes_total
    if total:
        print(
            f"bytes owned {human_bytes(plan.bytes_owned)} of {human_bytes(total)} "
            f"({100 * plan.bytes_owned / total:.1f}%)"
        )


def _owned_row(entry: EntryLike, decision: Decision) -> list[str]:
    local = "" if decision.local_key == decision.key else decision.local_key or ""
    nbytes = entry_nbytes(entry, decision)
    return [
        decision.key,
        local,
        decision.rule,
        selection_text(decision.selection),
        "" if nbytes is None else human_bytes(nbytes),
    ]


def _print_mesh_plan(plan: MeshPlan, name: str) -> None:
    total = plan.bytes_total
    rows = []
    for rank_plan in plan.ranks:
        share = f"{100 * rank_plan.bytes_owned / total:.1f}%" if total else ""
        rows.append(
            [
                str(rank_plan.rank),
                _coords(rank_plan.coords),
                str(len(rank_plan.owned)),
                human_bytes(rank_plan.bytes_owned) if total else "",
                share,
            ]
        )
    num_keys = len(plan.ranks[0].entries) if plan.ranks else 0
    print(
        f"{name}: {num_keys} keys over {len(plan.ranks)} ranks ({_mesh_text(plan.mesh)}), ruleset {plan.ruleset}"
    )
    print_table(["rank", "coords", "keys", "bytes", "share"], rows, align_right={2, 3, 4})
    if total:
        print(f"checkpoint {human_bytes(total)}")


def _coords(coords: dict[str, int]) -> str:
    return ",".join(f"{axis}={value}" for axis, value in coords.items())


def _mesh_text(mesh: dict[str, int]) -> str:
    return ",".join(f"{axis}={size}" for axis, size in mesh.items())


def _rules_list(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    for name in builtin_names():
        ruleset = load_ruleset(name)
        spec = ruleset.spec
        rows.append(
            {
                "name": name,
                "extends": [Path(s.removesuffix(" (built-in)")).stem for s in ruleset.extends],
                "axes": spec.axes,
                "families": spec.families,
                "summary": spec.summary,
            }
        )
    if args.format == "json":
        print_json(rows)
        return 0
    print_table(
        ["name", "extends", "axes", "families (model_type)", "summary"],
        [
            [
                r["name"],
                " < ".join(r["extends"]),
                ",".join(r["axes"]),
                ", ".join(r["families"]) or "any",
                r["summary"],
            ]
            for r in rows
        ],
    )
    return 0


def _rules_show(args: argparse.Namespace) -> int:
    path = Path(args.name)
    if not path.is_file():
        path = rule_file(args.name)[0]
    ruleset = load_ruleset(path)  # show only what loads
    print(f"# {path}")
    print(path.read_text(encoding="utf-8"), end="")
    if ruleset.extends:
        own = {rule.id for rule in load_ruleset_spec(path).rules}
        print(f"\n# extends {' < '.join(ruleset.extends)}; the merged rules, first match wins:")
        for rule in ruleset.program.rules:
            origin = (
                f"overrides {rule.spec.overrides!r}"
                if rule.spec.overrides
                else ("this file" if rule.id in own else "inherited")
            )
            when = (
                " when " + ", ".join(f"{k}={v}" for k, v in rule.spec.when.items()) if rule.spec.when else ""
            )
            print(f"#   {rule.id:<28} {origin:<32} {rule.spec.match or rule.spec.regex}{when}")
    return 0


def _load(args: argparse.Namespace) -> int:
    from ownership.assemble import save_shard
    from ownership.loader import load

    dtype = _torch_dtype(args.dtype) if args.dtype else None
    ruleset_name, params, config = _ruleset_args(args)
    ruleset = load_ruleset(ruleset_name)
    if args.checkpoint is None:
        raise OwnershipError("nothing to load", fix="give a checkpoint file or folder")
    result = load(
        ruleset, args.checkpoint, mesh=args.mesh, rank=args.rank, params=params, config=config, dtype=dtype
    )
    shapes = {entry.key: entry.shape for entry, _ in result.plan.owned_entries()}
    pieces = [(d, shapes[d.key] or (), result.tensors[d.local_key or d.key]) for d in result.plan.owned]
    info = {"ruleset": ruleset.name, "mesh": args.mesh, "rank": args.rank, "coords": result.plan.coords}
    save_shard(args.out, pieces, info=info)
    stats = result.stats
    summary = {
        "out": str(args.out),
        "rank": args.rank,
        "tensors": stats.num_tensors,
        "bytes_total": stats.bytes_total,
        "bytes_owned": stats.bytes_owned,
        "bytes_read": stats.bytes_read,
        "files_opened": stats.files_opened,
        "seconds": round(stats.seconds, 4),
    }
    if args.format == "json":
        print_json(summary)
    else:
        print(
            f"rank {args.rank}: {stats.num_tensors} tensors, read {human_bytes(stats.bytes_read)} "
            f"(owned {human_bytes(stats.bytes_owned)}) of {human_bytes(stats.bytes_total)} "
            f"in {stats.seconds:.3f} s -> {args.out}"
        )
    return 0


def _torch_dtype(name: str) -> Any:
    import torch

    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise OwnershipError(
            f"unknown dtype {name!r}",
            expected="a torch dtype name such as bfloat16 or float32",
            fix="pass --dtype bfloat16",
        )
    return value


def _lint(args: argparse.Namespace) -> int:
    from ownership.lint import lint, to_json, to_sarif, to_text
    from ownership.lint.output import rule_lines

    ruleset, params, config = _ruleset_args(args)
    source: Any = None
    if args.keys is not None or args.checkpoint is not None:
        source, _ = _entries(args)
    report = lint(ruleset, source, mesh=args.mesh, params=params, config=config)
    if args.format == "json":
        print_json(to_json(report))
    elif args.format == "sarif":
        print_json(to_sarif(report, rule_lines=rule_lines(str(rule_file(ruleset)[0]))))
    else:
        print(to_text(report))
    return report.exit_code


def _demo(args: argparse.Namespace) -> int:
    from ownership.demo import run_demo

    run_demo(ep=args.ep, rank=args.rank)
    return 0


def _schema(args: argparse.Namespace) -> int:
    del args
    print_json(ruleset_json_schema())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `ownership` command line: explain, plan, load, lint and test rulesets; tables for people, JSON for machines.

Exit status: 0 on success, 1 when a check finds problems (lint, test), 2 on unusable input (the message names
the file, rule, key and fix).

Each command reads its inputs once: the ruleset is loaded (or picked from the checkpoint's `model_type` for
`auto`) and the checkpoint opened a single time, then handed on as objects.

Example:
    $ ownership explain vllm-ep-lora base_model.model.model.layers.0.mlp.experts.70.up_proj.lora_A.weight \\
        --mesh ep=4 --param num_experts=128
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ownership.cli.render import (
    print_case_report,
    print_explanation,
    print_json,
    print_mesh_plan,
    print_rank_plan,
    print_table,
)
from ownership.errors import OutputError, OwnershipError, RulesetError
from ownership.formats.base import Checkpoint
from ownership.formats.detect import CHECKPOINT_SUFFIXES, open_checkpoint, read_json_object
from ownership.formats.dtypes import as_torch_dtype
from ownership.loading.entries import KeyEntry, check_shape, keys_config, read_keys_path
from ownership.loading.plan import MeshPlan, Plan, plan
from ownership.placement.mesh import to_mesh
from ownership.ruleset import (
    Ruleset,
    detect_ruleset,
    family_ruleset,
    load_ruleset,
    model_type_of,
    resolve_ruleset,
)
from ownership.spec.builtin import builtin_names, rule_source
from ownership.spec.params import coerce_param, merge_configs
from ownership.spec.schema import load_ruleset_spec, ruleset_json_schema
from ownership.units import human_bytes
from ownership.version import __version__

__all__ = ["main", "parse_params"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        with _terminated_as_exception():
            return handler(args)
    except OwnershipError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("terminated", file=sys.stderr)
        return 143


class _Terminated(BaseException):
    """SIGTERM, raised where the main thread is, so that what is being written is removed on the way out."""


@contextmanager
def _terminated_as_exception() -> Iterator[None]:
    def terminate(signum: int, frame: object) -> None:
        raise _Terminated

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: the caller's signals are its own
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_RULESET_HELP = (
    "built-in ruleset name, a model_type, a rule file path, or `auto` (from the checkpoint's config.json); "
    "may be left out when a checkpoint or --keys is given (then `auto`)"
)
_CONFIG_HELP = "the base model's config.json, for params and model_type (adapters carry none)"
_KEYS_HELP = (
    "key list: one key a line, optionally key<TAB>dtype<TAB>[shape]; or a model.safetensors.index.json (its "
    "key names, with the config.json beside it), to plan before the shards are downloaded"
)


_EXAMPLES = {
    "explain": """examples:
  ownership explain vllm-ep-lora base_model.model.model.layers.0.mlp.experts.70.up_proj.lora_A.weight \\
      --mesh ep=4 --param num_experts=128
  ownership explain auto model.layers.0.mlp.experts.gate_up_proj --checkpoint path/to/model --mesh ep=8,tp=2""",
    "plan": """examples:
  ownership plan path/to/model --mesh pp=2,ep=4 --all-ranks          # the ruleset from config.json's model_type
  ownership plan vllm-ep-lora path/to/adapter --mesh ep=8 --rank 3 --config path/to/base/config.json
  ownership plan llama --keys keys.tsv --mesh tp=4 --all-ranks --format json
  ownership plan path/to/model --legal-meshes 8      # which meshes of 8 ranks fit, why the others do not""",
    "load": """examples:
  ownership load path/to/model --mesh ep=8 --rank 3 --out rank3.safetensors
  ownership load vllm-ep-lora path/to/adapter --mesh ep=8 --rank 3 --param num_experts=128 --out r3.safetensors""",
    "lint": """examples:
  ownership lint path/to/model --mesh pp=2,ep=4,tp=2
  ownership lint --keys path/to/model.safetensors.index.json --mesh ep=8   # before the shards are downloaded
  ownership lint rules/my-moe.toml path/to/adapter --config path/to/base/config.json --mesh ep=8 --format sarif""",
    "test": """examples:
  ownership test vllm-ep-lora
  ownership test rules/my-moe.toml --cases rules/my-moe.cases.toml --format json""",
    "rules": """examples:
  ownership rules                  # the same as `ownership rules list`
  ownership rules show transformers-moe""",
}


def _subcommand(commands: Any, name: str, help_text: str, **options: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=help_text,
        description=options.pop("description", help_text[:1].upper() + help_text[1:] + "."),
        epilog=_EXAMPLES.get(name),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **options,
    )
    return parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ownership",
        description="Decide from declarative rules which part of a checkpoint each rank owns, and load exactly that.",
        epilog="Run `ownership COMMAND --help` for a command's options and examples; docs/ has the reference.",
    )
    parser.add_argument("--version", action="version", version=f"ownership {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    explain = _subcommand(commands, "explain", "which rule decides a key, and who owns what of it")
    explain.add_argument(
        "ruleset", help=_RULESET_HELP.replace("may be left out", "needs --checkpoint for auto")
    )
    explain.add_argument("key", help="tensor name")
    explain.add_argument(
        "--checkpoint",
        help="checkpoint file or folder: its config.json for params and `auto`, its header for the shape",
    )
    explain.add_argument(
        "--shape",
        type=_shape,
        help="tensor shape, e.g. 24,32 (needed by rules with a layout; read from --checkpoint)",
    )
    explain.add_argument("--rank", type=int, help="only this rank (default: every rank)")
    _common(explain)
    explain.set_defaults(handler=_explain)

    plan_ = _subcommand(commands, "plan", "what each rank owns of a checkpoint or key list")
    plan_.add_argument("ruleset", nargs="?", default="auto", help=_RULESET_HELP)
    plan_.add_argument("checkpoint", nargs="?", help="checkpoint file or folder")
    plan_.add_argument("--keys", type=Path, help=_KEYS_HELP)
    which = plan_.add_mutually_exclusive_group(required=True)
    which.add_argument("--rank", type=int, help="one rank")
    which.add_argument(
        "--legal-meshes",
        type=int,
        metavar="WORLD",
        help="lint every mesh of WORLD ranks over the ruleset's axes: which are legal, why the others are not",
    )
    which.add_argument("--all-ranks", action="store_true", help="every rank of the mesh")
    _common(plan_, mesh=False)
    plan_.add_argument("--wide", action="store_true", help="print keys whole, however wide the terminal")
    plan_.set_defaults(handler=_plan)

    rules = _subcommand(commands, "rules", "the built-in rulesets: list them, or show one")
    rules_commands = rules.add_subparsers(metavar="ACTION")
    rules_list = rules_commands.add_parser("list", help="list the built-in rulesets (the default)")
    rules_list.add_argument("--format", choices=("table", "json"), default="table", help=_FORMAT_HELP)
    rules_list.set_defaults(handler=_rules_list)
    rules_show = rules_commands.add_parser("show", help="print a ruleset's file, and the rules it inherits")
    rules_show.add_argument("name", help="built-in ruleset name or rule file path")
    rules_show.set_defaults(handler=_rules_show)
    rules.set_defaults(handler=_rules_list, format="table")

    load = _subcommand(commands, "load", "read one rank's share of a checkpoint into a safetensors file")
    load.add_argument("ruleset", help=_RULESET_HELP)
    load.add_argument("checkpoint", nargs="?", help="checkpoint file or folder")
    load.add_argument("--rank", type=int, required=True, help="the rank to load")
    load.add_argument("--out", type=Path, required=True, help="output .safetensors file (written atomically)")
    load.add_argument("--force", action="store_true", help="replace --out if it exists")
    load.add_argument("--dtype", help="cast floating-point tensors, e.g. bfloat16 (or bf16, fp16, float32)")
    _common(load)
    load.set_defaults(handler=_load)

    lint = _subcommand(commands, "lint", "prove a ruleset against a checkpoint and a mesh (exit 1 on errors)")
    lint.add_argument("ruleset", nargs="?", default="auto", help=_RULESET_HELP)
    lint.add_argument("checkpoint", nargs="?", help="checkpoint file or folder (headers only are read)")
    lint.add_argument("--keys", type=Path, help=_KEYS_HELP)
    _common(lint, formats=("text", "json", "sarif"))
    lint.set_defaults(handler=_lint)

    test = _subcommand(
        commands,
        "test",
        "run a ruleset's annotated cases (exit 1 on failures)",
        description="Check a ruleset against its case file: the owners, selection and local key of each key.",
    )
    test.add_argument("ruleset", help="built-in ruleset name or rule file path")
    test.add_argument(
        "--cases",
        type=Path,
        help="case file (default: NAME.cases.toml beside the rule file; built-ins in rules/)",
    )
    test.add_argument("--format", choices=("text", "json"), default="text", help=_FORMAT_HELP)
    test.set_defaults(handler=_test)

    schema = _subcommand(commands, "schema", "print the JSON Schema of rule files")
    schema.set_defaults(handler=_schema)

    demo = _subcommand(commands, "demo", "plan and load a synthetic MoE LoRA adapter at ep=4")
    demo.add_argument("--ep", type=int, default=4, help="expert-parallel size")
    demo.add_argument("--rank", type=int, default=1, help="the rank to load")
    demo.set_defaults(handler=_demo)

    return parser


_FORMAT_HELP = "text for people (the default), json for programs"


def _common(
    parser: argparse.ArgumentParser, *, formats: tuple[str, ...] = ("table", "json"), mesh: bool = True
) -> None:
    parser.add_argument(
        "--mesh",
        required=mesh,
        help="mesh axes in rank order, e.g. pp=2,ep=4" + ("" if mesh else " (not with --legal-meshes)"),
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a ruleset param (repeatable), e.g. num_experts=128; JSON values allowed",
    )
    parser.add_argument("--config", type=Path, help=_CONFIG_HELP)
    parser.add_argument(
        "--force-config",
        action="store_true",
        help="use --config even when its model_type is not the checkpoint's own",
    )
    parser.add_argument(
        "--format",
        choices=formats,
        default=formats[0],
        help=_FORMAT_HELP
        + (", sarif for CI systems that show findings inline" if "sarif" in formats else ""),
    )


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.strip("[]() ").split(",") if x.strip())
        check_shape(shape)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shape {text[:60]!r} is not a comma-separated list of ints"
        ) from None
    except OwnershipError as error:
        raise argparse.ArgumentTypeError(f"shape {text[:60]!r}: {error}") from None
    return shape


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


def _read_config(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    return read_json_object(
        path,
        what="the config file",
        expected="a config.json (a JSON object)",
        fix="point --config at the base model's config.json",
    )


def _explain(args: argparse.Namespace) -> int:
    config = _read_config(args.config)
    shape = args.shape
    if args.checkpoint is not None:
        # Its config gives params (and `auto` its ruleset), its header the key's shape.
        with open_checkpoint(_existing_checkpoint(args.checkpoint)) as checkpoint:
            config = merge_configs(checkpoint.config, config, force=args.force_config)
            if shape is None:
                shape = checkpoint.entry(args.key).shape
    ruleset = resolve_ruleset(args.ruleset, config, source=args.checkpoint or "the checkpoint")
    found = ruleset.explain(
        args.key, mesh=args.mesh, shape=shape, rank=args.rank, params=parse_params(args.param), config=config
    )
    if args.format == "json":
        print_json(found.to_json())
    else:
        print_explanation(found, rank=args.rank)
    return 0


@dataclass
class _Inputs:
    """What a plan, load or lint works on, each read once: the ruleset, the checkpoint (open) or key list, the
    params given and the `--config` file."""

    ruleset: Ruleset
    source: Checkpoint | list[KeyEntry] | None
    name: str
    """How the output names the source: the checkpoint's path or the key list's."""
    params: dict[str, Any]
    config: dict[str, Any] | None
    force_config: bool = False


@contextmanager
def _inputs(args: argparse.Namespace, *, mmap: bool = True) -> Iterator[_Inputs]:
    """The command's inputs; an open checkpoint (`mmap` as in `open_checkpoint`) is closed when the block ends.

    `ownership plan CKPT ...` (one positional that is a checkpoint) means `auto`: the ruleset is picked from the
    checkpoint's `model_type` (with --config laid over its config).
    """
    keys: Path | None = getattr(args, "keys", None)
    if args.checkpoint is None and keys is None and _is_checkpoint(args.ruleset):
        args.checkpoint, args.ruleset = args.ruleset, "auto"
    if args.checkpoint is not None:
        _existing_checkpoint(args.checkpoint)
    if keys is not None and args.checkpoint is not None:
        raise OwnershipError("give a checkpoint or --keys, not both", fix="drop one of them")
    config = _read_config(args.config)
    with ExitStack() as stack:
        source: Checkpoint | list[KeyEntry] | None = None
        name = ""
        if keys is not None:
            source, name = read_keys_path(keys), str(keys)
        elif args.checkpoint is not None:
            source, name = stack.enter_context(open_checkpoint(args.checkpoint, mmap=mmap)), args.checkpoint
        own = source.config if isinstance(source, Checkpoint) else keys_config(keys) if keys else None
        merged = merge_configs(own, config, force=args.force_config)
        if args.ruleset == "auto":
            ruleset = detect_ruleset(merged, source=args.checkpoint or "the checkpoint")
        else:
            ruleset = load_ruleset(args.ruleset)
            right = family_ruleset(ruleset, merged)
            if right is not None and args.handler is not _lint:  # lint reports it as a finding
                print(
                    f"warning: ruleset {ruleset.name!r} is not made for model_type {model_type_of(merged)!r}; the "
                    f"built-in for it is {right!r} (or `auto`)",
                    file=sys.stderr,
                )
        if keys is not None:
            config = (
                merged  # a key list has no config of its own to lay --config over but the one beside an index
            )
        yield _Inputs(ruleset, source, name, parse_params(args.param), config, args.force_config)


def _is_checkpoint(text: str) -> bool:
    """Whether a lone positional names a checkpoint (then the ruleset is `auto`): a folder, a weights or index
    file, or a path that is meant as one (a checkpoint's suffix, or a path that is no rule file), existing or
    not, so that a mistyped path is reported as the checkpoint it is."""
    path = Path(text)
    if path.is_dir() or path.suffix in CHECKPOINT_SUFFIXES:
        return True
    return not path.exists() and path.suffix != ".toml" and ("/" in text or os.sep in text)


def _existing_checkpoint(text: str) -> str:
    """`text`, unless no checkpoint is there: a `CheckpointError` naming it (and what is close by)."""
    if not Path(text).exists():
        open_checkpoint(text)  # the error, with its did-you-mean
    return text


def _plan(args: argparse.Namespace) -> int:
    if args.legal_meshes is not None:
        return _legal_meshes(args)
    if args.mesh is None:
        raise OwnershipError(
            "no mesh", expected="--mesh, e.g. pp=2,ep=4", fix="pass --mesh (or --legal-meshes WORLD)"
        )
    with _inputs(args) as given:
        if given.source is None:
            raise OwnershipError("nothing to plan", fix="give a checkpoint path or --keys FILE")
        result = plan(
            given.ruleset,
            given.source,
            mesh=args.mesh,
            rank=None if args.all_ranks else args.rank,
            params=given.params,
            config=given.config,
            force_config=given.force_config,
        )
    if args.format == "json":
        print_json(_plan_json(result, given.ruleset, mesh=args.mesh))
    elif isinstance(result, MeshPlan):
        own = given.source.config if isinstance(given.source, Checkpoint) else None
        bound = given.ruleset.bind(
            mesh=args.mesh,
            params=given.params,
            config=merge_configs(own, given.config, force=given.force_config),
        )
        print_mesh_plan(result, given.name, bound=bound)
    else:
        print_rank_plan(result, given.name, wide=args.wide)
    return 0


def _legal_meshes(args: argparse.Namespace) -> int:
    """`plan --legal-meshes WORLD`: every mesh of WORLD ranks, legal or not and why, with its bytes per rank."""
    from ownership.lint.legal import legal_meshes  # lint's modules are imported when a command needs them

    if args.mesh is not None:
        raise OwnershipError("--mesh and --legal-meshes together", fix="drop --mesh: every mesh is tried")
    with _inputs(args) as given:
        if given.source is None:
            raise OwnershipError("nothing to plan", fix="give a checkpoint path or --keys FILE")
        found = legal_meshes(
            given.ruleset,
            given.source,
            world=args.legal_meshes,
            params=given.params,
            config=given.config,
            force_config=given.force_config,
        )
    if args.format == "json":
        print_json([dataclasses.asdict(v) for v in found])
        return 0
    print(
        f"{given.name}: meshes of {args.legal_meshes} ranks over {', '.join(given.ruleset.spec.axes)}, ruleset "
        f"{given.ruleset.name}"
    )
    print_table(
        ["mesh", "verdict", "max/rank", "max/mean", "why (or the first warning)"],
        [
            [
                v.mesh,
                "legal" if v.legal else "illegal",
                "" if v.max_bytes is None else human_bytes(v.max_bytes),
                "" if v.max_over_mean is None else f"{v.max_over_mean:.3f}",
                v.reason,
            ]
            for v in found
        ],
        align_right={2, 3},
        shrink={4: "end"},
        wide=args.wide,
    )
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


def _rules_list(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    for name in builtin_names():
        ruleset = load_ruleset(name)
        spec = ruleset.spec
        rows.append(
            {
                "name": name,
                "extends": [parent.name for parent in ruleset.extends],
                "axes": spec.axes,
                "families": spec.families,
                "summary": spec.summary,
            }
        )
    if args.format == "json":
        print_json(rows)
        return 0
    print_table(
        ["name", "extends", "axes", "model types", "summary"],
        [
            [
                r["name"],
                ", ".join(r["extends"][:1]),
                ",".join(r["axes"]),
                ", ".join(r["families"]) or "any",
                r["summary"],
            ]
            for r in rows
        ],
        shrink={3: "end", 4: "end"},
    )
    return 0


def _rules_show(args: argparse.Namespace) -> int:
    path = Path(args.name)
    origin = rule_source(path if path.is_file() else args.name)
    ruleset = load_ruleset(path if path.is_file() else args.name)  # show only what loads
    assert origin.path is not None
    print(f"# {origin.path}")
    print(origin.path.read_text(encoding="utf-8"), end="")
    if ruleset.extends:
        own = {rule.id for rule in load_ruleset_spec(origin.path).rules}
        print(f"\n# extends {' < '.join(map(str, ruleset.extends))}; the merged rules, first match wins:")
        for rule in ruleset.program.rules:
            written = (
                f"overrides {rule.spec.overrides!r}"
                if rule.spec.overrides
                else ("this file" if rule.id in own else "inherited")
            )
            when = (
                " when " + ", ".join(f"{k}={v}" for k, v in rule.spec.when.items()) if rule.spec.when else ""
            )
            print(f"#   {rule.id:<28} {written:<32} {rule.spec.match or rule.spec.regex}{when}")
    return 0


def _load(args: argparse.Namespace) -> int:
    from ownership.formats.shardfile import save_shard
    from ownership.loading.loader import load

    dtype = as_torch_dtype(args.dtype)
    # Private copies, not views of the file's pages: the output is written from them, and a checkpoint rewritten
    # meanwhile must be an error, not a crash.
    with _inputs(args, mmap=False) as given:
        if not isinstance(given.source, Checkpoint):
            raise OwnershipError("nothing to load", fix="give a checkpoint file or folder")
        out = args.out.resolve()
        if any(out == path.resolve() for path in given.source.files()):
            raise OutputError(
                "the output would overwrite a file of the checkpoint being read",
                source=str(args.out),
                expected="a file outside the checkpoint",
                fix="choose another --out",
            )
        if out.is_file() and not args.force:
            raise OutputError(
                "the output exists",
                source=str(args.out),
                expected="a new file",
                fix="pass --force to replace it, or choose another --out",
            )
        result = load(
            given.ruleset,
            given.source,
            mesh=args.mesh,
            rank=args.rank,
            params=given.params,
            config=given.config,
            dtype=dtype,
            force_config=given.force_config,
        )
        shapes = {entry.key: entry.shape for entry, _ in result.plan.owned_entries()}
        pieces = [(d, shapes[d.key] or (), result.tensors[d.local_key or d.key]) for d in result.plan.owned]
        info = {
            "ruleset": given.ruleset.name,
            "mesh": args.mesh,
            "rank": args.rank,
            "coords": result.plan.coords,
        }
        # Written while the checkpoint is open: tensors may be views of its pages.
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


def _lint(args: argparse.Namespace) -> int:
    from ownership.lint import lint, to_json, to_sarif, to_text
    from ownership.lint.output import rule_lines

    with _inputs(args) as given:
        report = lint(
            given.ruleset,
            given.source,
            mesh=args.mesh,
            params=given.params,
            config=given.config,
            force_config=given.force_config,
        )
    if args.format == "json":
        print_json(to_json(report))
    elif args.format == "sarif":
        lines = rule_lines(report.rule_file) if report.rule_file is not None else {}
        print_json(to_sarif(report, rule_lines=lines))
    else:
        print(to_text(report))
    return report.exit_code


def _test(args: argparse.Namespace) -> int:
    """`ownership test RULESET [--cases FILE] [--format text|json]`: run a ruleset's case file; 0 when every
    check passes, 1 when one fails, 2 (the error on stderr) when the ruleset or the case file cannot be used."""
    from ownership.lint.case_file import case_file_for, load_cases
    from ownership.lint.cases import run_cases

    ruleset = load_ruleset(args.ruleset)
    path = Path(args.cases) if args.cases else case_file_for(ruleset)
    if not path.is_file():
        raise RulesetError(
            f"no case file for ruleset {ruleset.name!r}",
            source=str(path),
            found="no such file",
            fix="write one (docs/cases.md), or pass --cases FILE",
            code="no-case-file",
        )
    report = run_cases(ruleset, load_cases(path))
    if args.format == "json":
        print_json(report.to_json())
    else:
        print_case_report(report)
    return 0 if report.ok else 1


def _demo(args: argparse.Namespace) -> int:
    from ownership.cli.demo import run_demo

    run_demo(ep=args.ep, rank=args.rank)
    return 0


def _schema(args: argparse.Namespace) -> int:
    del args
    print_json(ruleset_json_schema())
    return 0

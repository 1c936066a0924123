"""The `runner` command: `runner RECIPE [key=value ...]` trains; subcommands validate, plan, import, ...

Each subcommand is one small function registered in `COMMANDS`; its heavy imports (torch, the models)
happen inside the function, so `runner --help` and `runner validate` start in well under a second.
A `UserError` becomes a readable message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from runner.errors import UserError

USAGE = """runner RECIPE [key=value ...]          train (key=value overrides, e.g. training.max_steps=500)
       runner COMMAND ...                     see the commands below; `runner COMMAND --help` for each"""


@dataclass(frozen=True)
class Command:
    """One subcommand: its one-line help, how it declares its arguments, and what it runs (exit status)."""

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _split(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Recipe files and `key=value` overrides, in their given order."""
    return [i for i in items if "=" not in i], [i for i in items if "=" in i]


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file (see recipes/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override recipe values, e.g. training.learning_rate=5e-5 data.sources.0.repeats=3",
    )


def _one_recipe(args: argparse.Namespace) -> tuple[str, list[str]]:
    recipes, overrides = _split([args.recipe, *args.overrides])
    if len(recipes) != 1:
        raise UserError(f"expected one recipe file and key=value overrides, got {' '.join(recipes)}")
    return recipes[0], overrides


def _train(args: argparse.Namespace) -> int:
    from runner.recipe import read_recipe
    from runner.train import train

    recipe, overrides = _one_recipe(args)
    train(read_recipe(recipe, overrides, paths="error"))
    return 0


def _validate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "items",
        nargs="+",
        metavar="RECIPE|key=value",
        help="recipe files to check, and key=value overrides applied to each",
    )
    parser.add_argument(
        "--check-paths",
        action="store_true",
        help="treat local files and folders that do not exist as errors (as training does); "
        "without it they are warnings, so recipes validate before their data is made",
    )


def _validate(args: argparse.Namespace) -> int:
    from runner.recipe import RecipeError, read_recipe

    recipes, overrides = _split(args.items)
    if not recipes:
        raise UserError("give at least one recipe file, e.g. runner validate recipes/stage_c_lora.yaml")
    failed = 0
    for recipe in recipes:
        try:
            loaded = read_recipe(recipe, overrides, paths="error" if args.check_paths else "warn")
        except RecipeError as e:
            print(e)
            failed += 1
            continue
        print(f"{recipe}: OK")
        for warning in loaded.warnings:
            print(f"  warning: {warning.render()}")
    return 2 if failed else 0


def _plan_args(parser: argparse.ArgumentParser) -> None:
    _recipe_args(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object (recipe + plan)")


def _plan(args: argparse.Namespace) -> int:
    from runner.plan import run_plan

    recipe, overrides = _one_recipe(args)
    return run_plan(recipe, overrides, as_json=args.json)


def _cache(args: argparse.Namespace) -> int:
    from runner.cache_cmd import run_cache

    recipe, overrides = _one_recipe(args)
    return run_cache(recipe, overrides)


def dump_yaml(data: object) -> str:
    """YAML for people: block style, short scalar lists inline, keys in schema order."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def represent_list(dumper: yaml.SafeDumper, value: list) -> yaml.Node:
        flow = all(not isinstance(v, dict | list) for v in value) and len(str(value)) < 80
        return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)

    Dumper.add_representer(list, represent_list)
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=110)


def _import_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tool", choices=["simpletuner"], help="where the configuration comes from")
    parser.add_argument("config", help="SimpleTuner config/config.json")
    parser.add_argument(
        "--backend",
        help="multidatabackend.json (default: the file named by the config's data_backend_config)",
    )
    parser.add_argument("-o", "--output", help="recipe file to write (default: print it)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")


def _import(args: argparse.Namespace) -> int:
    from runner.importers.simpletuner import import_simpletuner

    return import_simpletuner(args.config, backend=args.backend, output=args.output, force=args.force)


def _sample_args(parser: argparse.ArgumentParser) -> None:
    from runner.sample import add_arguments

    add_arguments(parser)


def _sample(args: argparse.Namespace) -> int:
    from runner.sample import run

    return run(args)


def _export_args(parser: argparse.ArgumentParser) -> None:
    from runner.export import add_export_arguments

    add_export_arguments(parser)


def _export(args: argparse.Namespace) -> int:
    from runner.export import run_export

    return run_export(args)


def _push_args(parser: argparse.ArgumentParser) -> None:
    from runner.hub_push import add_push_arguments

    add_push_arguments(parser)


def _push(args: argparse.Namespace) -> int:
    from runner.hub_push import run_push

    return run_push(args)


COMMANDS: dict[str, Command] = {
    "train": Command(
        "train from a recipe (the default: `runner RECIPE` is `runner train RECIPE`)", _recipe_args, _train
    ),
    "validate": Command(
        "check recipes against the schema and the cross-field rules; prints OK or every problem",
        _validate_args,
        _validate,
    ),
    "plan": Command(
        "print the resolved recipe, then what a run would fetch, its data, buckets, steps, cache status and "
        "estimated GPU memory, without downloading or loading anything",
        _plan_args,
        _plan,
    ),
    "cache": Command(
        "precompute the text-embedding (and, when on, latent) caches of a recipe's data; safe to re-run",
        _recipe_args,
        _cache,
    ),
    "import": Command("convert another trainer's configuration into a recipe", _import_args, _import),
    "sample": Command(
        "generate images from prompts (Stage C, then Stage B + A or the Previewer), optionally with LoRAs",
        _sample_args,
        _sample,
    ),
    "export": Command(
        "convert a LoRA file between formats (native, ComfyUI, PEFT, official) or merge it into the base; "
        "write a full fine-tune's checkpoint (FSDP-sharded too) as one file",
        _export_args,
        _export,
    ),
    "push": Command(
        "upload a finished run (exports, model card, validation images) to the Hugging Face Hub, as "
        "hub.push does at the end of training; also to retry a failed upload",
        _push_args,
        _push,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runner",
        usage=USAGE,
        description="cascade-runner: train the Stable Cascade Stage C prior (LoRA or full) from a recipe.",
        epilog="Exit status: 0 success, 2 a problem you can fix (the message says how), 1 anything else.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        command.arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `runner` console script; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and not args_list[0].startswith("-") and args_list[0] not in COMMANDS:
        args_list.insert(0, "train")
    args = build_parser().parse_args(args_list)
    try:
        return COMMANDS[args.command].run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

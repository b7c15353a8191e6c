"""The `openrlhf` / `emdpo` command line.

Each subcommand is a small `add_<name>(subparsers)` function registered in `COMMANDS` (and
`DATA_COMMANDS` for `data ...`), so adding `export`, `serve` or `data build` is one function
plus one dict entry. User errors (`EmdpoError`) print as one `error: ...` line, exit code 2.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from . import registry
from .algorithms.defaults import HEDGE_ETA, HEDGE_STEPS
from .config import format_validation_error
from .errors import EmdpoError

AddCommand = Callable[[Any], argparse.ArgumentParser]


# --- run -----------------------------------------------------------------------------------


def add_run(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("run", help="run a recipe's stages", description="Run a YAML recipe, stage by stage.")
    p.add_argument("recipe", metavar="RECIPE", help="recipe YAML file")
    p.add_argument("--output-dir", "-o", metavar="DIR", help="run folder (default: the recipe's output_dir)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set stages.em.config.K=3 (repeatable; VALUE is YAML)",
    )
    p.add_argument("--resume", action="store_true", help="skip stages already done with the same config")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan; run nothing")
    p.add_argument("--seeds", metavar="S1,S2,...", default=None,
                   help="run once per seed into DIR/seed-<s>/ and summarise with intervals in DIR/summary/")
    p.add_argument("--allow-extends-outside", action="store_true",
                   help="let `extends:` name absolute paths and files outside the recipe's folder tree "
                        "(refused by default; also EMDPO_ALLOW_EXTENDS_OUTSIDE=1)")
    p.set_defaults(func=cmd_run)
    return p


def cmd_run(args: argparse.Namespace) -> int:
    if getattr(args, "seeds", None) is not None:
        from .recipe.seeds import cmd_run_seeds

        return cmd_run_seeds(args)
    from .recipe.loader import load_recipe
    from .recipe.schema import format_plan, validate_recipe

    raw = load_recipe(args.recipe, args.overrides, allow_extends_outside=args.allow_extends_outside or None)
    plan = validate_recipe(raw, source=str(args.recipe))
    output_dir = args.output_dir or raw.get("output_dir")
    if args.dry_run:
        print(format_plan(plan, output_dir))
        return 0
    if not output_dir:
        raise EmdpoError(f"{args.recipe}: output_dir: not set; add it to the recipe or pass --output-dir")
    from .recipe.runner import run_plan

    run_plan(plan, output_dir, resume=args.resume)
    return 0


# --- trainers ------------------------------------------------------------------------------


def add_trainers(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "trainers", help="the config reference: recipe keys, model: sections, trainer types and their fields",
        description="Every key a recipe may set, with type, default and description: the top level, the model: "
                    "section of each registered backend, and each registered trainer's inputs and config "
                    "(only the named trainers when TRAINER is given).")
    p.add_argument("names", nargs="*", metavar="TRAINER", help="only these (registered names or module:Class)")
    p.add_argument("--markdown", action="store_true", help="print Markdown (docs/recipes.md is this output)")
    p.set_defaults(func=cmd_trainers)
    return p


def cmd_trainers(args: argparse.Namespace) -> int:
    from .reference import markdown_reference, text_reference

    render = markdown_reference if args.markdown else text_reference
    print(render(args.names or None).rstrip("\n"))
    return 0


# --- data ----------------------------------------------------------------------------------


def add_data_validate(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "validate", help="check a dataset (file, folder, save_to_disk folder or hub id) against format v1",
        description="Check data the way the data stage reads it; lists the extra columns kept as metadata.")
    p.add_argument("path", metavar="PATH", help="a .jsonl/.parquet file, a dataset folder, a save_to_disk folder "
                                                "or a hub dataset id")
    p.add_argument("--keys", metavar="FIELD=COLUMN,...", default=None,
                   help="read fields from other columns, e.g. prompt=question,chosen=good,rejected=bad,annotator=user "
                        "(fields: prompt, chosen, rejected, responses, ranking, annotator, group)")
    p.set_defaults(func=cmd_data_validate)
    return p


def cmd_data_validate(args: argparse.Namespace) -> int:
    from .data.keys import parse_keys
    from .data.validate import validate_path

    report = validate_path(args.path, parse_keys(args.keys))
    print(report.summary())
    return 0


def add_data_build(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "build", help="build a dataset folder with a registered data builder",
        description="Run a data builder (a registered name or module:function) and write DIR/train.jsonl, "
                    "DIR/test.jsonl and DIR/manifest.json.",
    )
    p.add_argument("name", metavar="NAME", help="builder: a registered name (e.g. imdb_synthetic, bandit) or module:function")
    p.add_argument("--config", metavar="FILE", help="builder config (YAML mapping)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="set a config value, e.g. --set source.kind=generated (repeatable; dotted keys nest; VALUE is YAML)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output dataset folder")
    p.set_defaults(func=cmd_data_build)
    return p


def set_dotted(config: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place; parsed like recipe overrides (YAML values)."""
    from .recipe.loader import parse_override

    parts, value = parse_override(override, path="data build")
    key = ".".join(parts)
    node = config
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise EmdpoError(
                f"--set {key}: config key '{'.'.join(parts[: i + 1])}' holds {child!r}, not a mapping"
            )
        node = child
    node[parts[-1]] = value


def _builder_config_error(name: str, exc: Exception) -> EmdpoError:
    """A pydantic ValidationError from a builder as one line naming each dotted key."""
    return EmdpoError(f"data builder {name!r}: " + format_validation_error(exc, config_keys=True))


def cmd_data_build(args: argparse.Namespace) -> int:
    import time

    from pydantic import ValidationError

    from .data.io import write_dataset_dir
    from .data.manifest import build_manifest
    from .safe_yaml import read_yaml

    config: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        loaded = read_yaml(path, what="--config file")
        if loaded is not None and not isinstance(loaded, dict):
            raise EmdpoError(f"--config {path}: expected a mapping at the top level, got {type(loaded).__name__}")
        config = loaded or {}
    for override in args.overrides:
        set_dotted(config, override)
    # `seed` is read here (default 0) and passed as the builder's seed argument
    seed = config.pop("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise EmdpoError(f"config key 'seed': expected an integer, got {seed!r}")

    build = registry.get(registry.DATA_BUILDERS, args.name)
    if not callable(build):
        raise EmdpoError(f"data builder {args.name!r} is not callable (got {type(build).__name__})")
    start = time.perf_counter()
    try:
        built = build(config, seed=seed)
    except ValidationError as exc:
        raise _builder_config_error(args.name, exc) from None
    resolved = dict(built.config)
    resolved.setdefault("seed", seed)
    manifest = build_manifest(built.train, built.test, builder=args.name, config=resolved, labels=built.labels,
                              extra=built.extra, val=built.val, disjoint_prompts=built.disjoint_prompts)
    out = write_dataset_dir(args.out, built.train, built.test, manifest, val=built.val)
    counts = manifest["counts"]
    groups = ", ".join(f"{g} {n}" for g, n in counts["groups"].items()) or "none"
    val = f", {counts['comparisons']['val']} val" if "val" in counts["comparisons"] else ""
    print(
        f"wrote {out}: {counts['comparisons']['train']} train{val} and {counts['comparisons']['test']} test comparisons, "
        f"{counts['annotators']} annotators (groups: {groups}) in {time.perf_counter() - start:.1f}s"
    )
    return 0


DATA_COMMANDS: dict[str, AddCommand] = {
    "validate": add_data_validate,
    "build": add_data_build,
}


def add_data(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("data", help="dataset tools")
    sub = p.add_subparsers(dest="data_command", metavar="{" + ",".join(DATA_COMMANDS) + "}")
    for add in DATA_COMMANDS.values():
        add(sub)
    p.set_defaults(func=lambda args: _missing_subcommand(p))
    return p


# --- serve / export ------------------------------------------------------------------------


def add_serve(subparsers: Any) -> argparse.ArgumentParser:
    from .serve import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_STARTUP_TIMEOUT, ROUTER_MODES, RouterLimits
    from .serve.placement import DEFAULT_OMP_SPINCOUNT, DEFAULT_RESERVED_CPUS

    p = subparsers.add_parser(
        "serve", help="serve an exported ensemble on vLLM behind a weighted OpenAI-compatible router",
        description="Start vLLM's OpenAI server with every adapter of ROUTING.yaml and route /v1/completions and "
                    "/v1/chat/completions: model 'ensemble' samples adapter k with probability w_k per request "
                    "(sticky per `user`); an adapter's name goes to it. A LoRA ensemble is routed inside vLLM's "
                    "own server; full-model ensembles (one vLLM each) by a router process in front.",
    )
    p.add_argument("routing", metavar="ROUTING.yaml", help="routing config written by a minmax_ensemble stage or export")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"public bind address (default: {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"public port (default: {DEFAULT_PORT})")
    p.add_argument("--router", choices=ROUTER_MODES, default="auto",
                   help="where the mixture is routed: in-vllm (middleware in vLLM's API server, no extra hop), "
                        "proxy (a router process in front of vLLM on a loopback port), auto (default): in-vllm "
                        "for a LoRA ensemble, proxy for full-model types")
    p.add_argument("--vllm-arg", dest="vllm_args", action="append", default=[], metavar="ARG",
                   help="extra argument for vLLM's server, e.g. --vllm-arg=--max-model-len=256 (repeatable)")
    p.add_argument("--vllm-port", type=int, default=None,
                   help="vLLM's loopback port behind --router proxy (default: a free port)")
    p.add_argument("--seed", type=int, default=0, help="seed of the adapter draws and of vLLM")
    p.add_argument("--startup-timeout", type=float, default=DEFAULT_STARTUP_TIMEOUT, metavar="S",
                   help="seconds to wait for vLLM")
    limits = p.add_argument_group("request limits (each refusal is a one-line JSON error)")
    d = RouterLimits()
    limits.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, metavar="N",
                        help=f"largest request body; larger is 413 (default: {d.max_body_bytes / 2**20:g} MiB)")
    limits.add_argument("--max-json-depth", type=int, default=d.max_json_depth, metavar="N",
                        help=f"deepest nesting of arrays/objects in a request; deeper is 400 (default: {d.max_json_depth})")
    limits.add_argument("--request-timeout", type=float, default=d.request_timeout, metavar="S",
                        help="total seconds for a request: its body, then vLLM's whole answer (a stream's first "
                             f"bytes); later is 408/504 (default: {d.request_timeout:g})")
    limits.add_argument("--max-stream-seconds", type=float, default=d.max_stream_seconds, metavar="S",
                        help=f"a streamed answer is cut with an error event after S seconds (default: {d.max_stream_seconds:g})")
    cpus = p.add_argument_group(
        "CPU placement of vLLM-CPU and the router (docs/serving.md)")
    cpus.add_argument("--vllm-cpus", metavar="LIST",
                      help="CPUs for vLLM-CPU's OpenMP threads, e.g. 0-13 (VLLM_CPU_OMP_THREADS_BIND; "
                           "default: vLLM's auto binding over every core it does not reserve)")
    cpus.add_argument("--vllm-reserved-cpus", type=int, metavar="N",
                      help="cores vLLM-CPU's auto binding leaves to other processes "
                           f"(VLLM_CPU_NUM_OF_RESERVED_CPU; default: {DEFAULT_RESERVED_CPUS})")
    cpus.add_argument("--vllm-omp-spincount", type=int, metavar="N",
                      help="turns vLLM-CPU's idle OpenMP threads spin before they sleep (GOMP_SPINCOUNT; "
                           f"default: {DEFAULT_OMP_SPINCOUNT}, libgomp's own: 300000)")
    cpus.add_argument("--router-cpus", metavar="LIST",
                      help="pin the router process (--router proxy) to these CPUs, e.g. the reserved ones "
                           "(default: unpinned)")
    p.add_argument("--log-dir", metavar="DIR", help="vLLM logs (default: serve-logs/ beside ROUTING.yaml)")
    p.set_defaults(func=cmd_serve)
    return p


def _positive(value: float, flag: str) -> float:
    """`value` if it is a finite number > 0, else a one-line error naming `flag`."""
    if not (math.isfinite(value) and value > 0):
        raise EmdpoError(f"{flag}: expected a finite positive number, got {value!r}")
    return value


def _port(value: int | None, flag: str) -> None:
    if value is not None and not 1 <= value <= 65535:
        raise EmdpoError(f"{flag}: expected a port number in 1..65535, got {value}")


def cmd_serve(args: argparse.Namespace) -> int:
    _port(args.port, "--port")
    _port(args.vllm_port, "--vllm-port")
    _positive(args.startup_timeout, "--startup-timeout")
    from .serve import CpuPlacement, RouterLimits, serve

    try:
        limits = RouterLimits(max_body_bytes=args.max_body_bytes, request_timeout=args.request_timeout,
                              max_stream_seconds=args.max_stream_seconds, max_json_depth=args.max_json_depth)
    except ValueError as exc:
        raise EmdpoError(str(exc)) from None
    placement = CpuPlacement(vllm_cpus=args.vllm_cpus, vllm_reserved_cpus=args.vllm_reserved_cpus,
                             omp_spincount=args.vllm_omp_spincount, router_cpus=args.router_cpus)
    placement.check()
    return serve(args.routing, host=args.host, port=args.port, vllm_args=args.vllm_args, vllm_port=args.vllm_port,
                 seed=args.seed, startup_timeout=args.startup_timeout, limits=limits, log_dir=args.log_dir,
                 placement=placement, router=args.router)


def add_export(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="re-export a finished minmax stage with other priority weights (no retraining)",
        description="Re-solve the min-max regret game of a finished minmax_ensemble stage from its saved L matrix "
                    "with per-type priority weights (the paper's weighted variants) and write a new serving "
                    "folder: routing.yaml, adapters/, game.npz, ensemble.json.",
    )
    p.add_argument("stage", metavar="STAGE_DIR", help="a finished minmax stage folder, e.g. runs/demo/minmax")
    p.add_argument("--priority", required=True, metavar="C1,C2,...",
                   help="one positive weight per type, in routing.yaml's adapter order, e.g. 1,4")
    p.add_argument("--out", required=True, metavar="DIR", help="new serving folder")
    p.add_argument("--eta", type=float, default=HEDGE_ETA, help=f"optimistic Hedge step size (default {HEDGE_ETA})")
    p.add_argument("--steps", type=int, default=HEDGE_STEPS, help=f"optimistic Hedge iterations (default {HEDGE_STEPS})")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args: argparse.Namespace) -> int:
    from .export.reweight import reexport

    try:
        priority = [float(x) for x in args.priority.split(",")]
    except ValueError:
        raise EmdpoError(f"--priority: expected comma-separated numbers, got {args.priority!r}") from None
    if not all(map(math.isfinite, priority)):  # positive, and one per type, is checked against the stage
        raise EmdpoError(f"--priority: expected finite numbers, got {args.priority!r}")
    _positive(args.eta, "--eta")
    if args.steps < 1:
        raise EmdpoError(f"--steps: expected a positive integer, got {args.steps}")
    summary = reexport(args.stage, args.out, priority, eta=args.eta, steps=args.steps)
    weights = ", ".join(f"{k}={v:.3f}" for k, v in summary["weights"].items())
    print(f"wrote {summary['routing']}: {weights} (game value {summary['hedge_value']:.4f}, LP {summary['lp_value']:.4f})")
    return 0


# --- parser --------------------------------------------------------------------------------

COMMANDS: dict[str, AddCommand] = {
    "run": add_run,
    "trainers": add_trainers,
    "data": add_data,
    "serve": add_serve,
    "export": add_export,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "openrlhf",
        description="EM-DPO, Cluster-DPO and MinMax-DPO for heterogeneous annotators (OpenRLHF plugin).",
    )
    parser.add_argument("--version", action=_VersionAction,
                        help="print the versions of this plugin, OpenRLHF, torch, DeepSpeed, vLLM, transformers, peft")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for add in COMMANDS.values():
        add(sub)
    parser.set_defaults(func=lambda args: _missing_subcommand(parser))
    return parser


class _VersionAction(argparse.Action):
    """`--version`: the plugin's and its stack's versions, looked up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: str | None = None) -> None:
        from .versions import version_report

        print(version_report())
        parser.exit()


def _missing_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def strip_local_rank(argv: Sequence[str]) -> list[str]:
    """Drop the DeepSpeed launcher's `--local_rank=N` (or `--local-rank N`), wherever it stands,
    into LOCAL_RANK (the launcher sets it too; torchrun only sets the variable)."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name in ("--local_rank", "--local-rank"):
            value = value if eq else next(it, "")
            if not value.isdigit():
                raise EmdpoError(f"{name}: expected a process index, got {value!r}")
            os.environ.setdefault("LOCAL_RANK", value)
            continue
        out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console scripts and `python -m emdpo_plugin`; returns the exit code."""
    parser = build_parser()
    try:
        argv = strip_local_rank(sys.argv[1:] if argv is None else argv)
    except EmdpoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        return int(args.func(args) or 0)
    except EmdpoError as exc:
        message = re.sub(r"\s*\n\s*", " ", str(exc).strip()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

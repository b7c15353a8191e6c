"""`openrlhf run RECIPE --seeds 0,1,2 --output-dir D`: one ordinary run per seed, then a summary.

Each seed is the recipe with `seed: s` (applied after the user's `--set` overrides, so it wins)
run by the normal runner into `D/seed-<s>/`: the data builder, model initialisation, sampling
and the report all follow the seed, and `--resume` continues each seed's run exactly as it
continues a single run. When every seed has finished, `eval/summary.py` writes `D/summary/`
(metrics.json with {mean, ci95, per_seed} per policy, group and metric; report.md; figures).
Seeds run one after another in this process: the stages already use the machine's cores.
A recipe that pins a seed of its own (`data.seed`, a builder's `config.seed`) keeps it: then
that part stays fixed across seeds, which the summary cannot tell.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.markup import escape

from ..errors import EmdpoError, RecipeError


MAX_SEEDS = 1000
MAX_SEED = 2**32 - 1  # numpy's bound


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' (or '0-2') -> [0, 1, 2]; seeds are 0..2**32-1 (numpy's rule), at most 1000; one-line errors."""
    seeds: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        lo, hi = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, -1)
        if lo > hi:
            raise RecipeError(f"--seeds: expected comma-separated non-negative integers such as 0,1,2 "
                              f"(or a range 0-2), got {part!r}")
        if hi > MAX_SEED or len(seeds) + hi - lo + 1 > MAX_SEEDS:
            raise RecipeError(f"--seeds: at most {MAX_SEEDS} seeds, each at most {MAX_SEED}; got {part!r}")
        seeds += range(lo, hi + 1)
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise RecipeError(f"--seeds: seed {dup[0]} is listed twice")
    return seeds


def seed_plans(recipe: str | Path, seeds: Sequence[int], overrides: Sequence[str], *,
               allow_extends_outside: bool | None = None) -> list[Any]:
    """One validated Plan per seed (all validated before anything runs)."""
    from .loader import load_recipe
    from .schema import validate_recipe

    plans = []
    for s in seeds:
        raw = load_recipe(recipe, [*overrides, f"seed={s}"], allow_extends_outside=allow_extends_outside)
        plans.append(validate_recipe(raw, source=str(recipe)))
    return plans


def run_seeds(recipe: str | Path, seeds: Sequence[int], output_dir: str | Path, *, overrides: Sequence[str] = (),
              resume: bool = False, console: Console | None = None, n_boot: int = 2000,
              allow_extends_outside: bool | None = None) -> Path:
    """Run every seed into `output_dir/seed-<s>/`, then write `output_dir/summary/`; returns it."""
    from ..eval.summary import seed_dir, write_summary
    from .runner import run_plan
    from .state import RunState

    console = console or Console(highlight=False)
    root = Path(output_dir)
    plans = seed_plans(recipe, seeds, overrides, allow_extends_outside=allow_extends_outside)
    if not resume:  # refuse before spending time on the first seed, not after it
        for s in seeds:
            prev = RunState.load(seed_dir(root, s))
            if prev is not None and prev.done_stages():
                raise EmdpoError(f"{seed_dir(root, s)} already holds a run with finished stages "
                                 f"({', '.join(prev.done_stages())}); pass --resume to continue, or choose another --output-dir")
    started = time.perf_counter()
    for i, (s, plan) in enumerate(zip(seeds, plans), start=1):
        run_dir = seed_dir(root, s)
        console.rule(f"[bold]seed {s}[/] ({i}/{len(seeds)}) -> {escape(str(run_dir))}")
        t0 = time.perf_counter()
        try:
            run_plan(plan, run_dir, resume=resume, console=console)
        except BaseException:
            console.print(f"[bold red]seed {s} failed[/]; fix it and rerun with --resume "
                          "(finished seeds and stages are kept)")
            raise
        elapsed = time.perf_counter() - started
        left = (len(seeds) - i) * elapsed / i
        console.print(f"[bold green]seed {s} done[/] in {time.perf_counter() - t0:.1f}s "
                      f"({i}/{len(seeds)} seeds; about {left:.0f}s left)")
    console.rule("[bold]summary")
    out = write_summary(root, list(seeds), n_boot=n_boot)
    console.print(f"wrote {escape(str(out / 'metrics.json'))} and {escape(str(out / 'report.md'))} "
                  f"({len(seeds)} seeds, {time.perf_counter() - started:.1f}s in all)")
    return out


def cmd_run_seeds(args: Any) -> int:
    """The `run --seeds` branch of the CLI (args as parsed by cli.add_run)."""
    from .loader import load_recipe

    seeds = parse_seeds(args.seeds)
    outside = getattr(args, "allow_extends_outside", None) or None
    root = args.output_dir or load_recipe(args.recipe, args.overrides, allow_extends_outside=outside).get("output_dir")
    if args.dry_run:
        from .schema import format_plan

        plans = seed_plans(args.recipe, seeds, args.overrides, allow_extends_outside=outside)
        print(format_plan(plans[0], str(Path(root) / f"seed-{seeds[0]}") if root else None))
        print(f"# seeds: {', '.join(map(str, seeds))} -> {root}/seed-<s>/ and {root}/summary/ "
              f"({len(plans)} plans validated)")
        return 0
    if not root:
        raise EmdpoError(f"{args.recipe}: output_dir: not set; add it to the recipe or pass --output-dir")
    run_seeds(args.recipe, seeds, root, overrides=args.overrides, resume=args.resume, allow_extends_outside=outside)
    return 0

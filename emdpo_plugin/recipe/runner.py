"""Stage runner: runs a validated `Plan` in order, recording each stage in run.json.

Resume rule (`reuse`): a done stage is skipped while its key is unchanged: its config, the
run-wide seed, model and data sections, what it reads from outside the run, and the output
fingerprints of the stages it depends on. So exactly the stages downstream of a change re-run.
A stage is done only once its validated outputs are in run.json, and its folder is emptied (but
for its resume state) before it runs again (`stage_dir`).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape

from .. import dist, faults, runlog, tracking
from ..artifacts import validate_outputs
from ..backends.factory import default_backend_factory
from ..errors import EmdpoError, RecipeError
from ..executors import make_executor
from ..fingerprint import output_fingerprint
from ..trainers.base import StageContext
from .lock import run_lock
from .reuse import reusable_stages, source_identity, stage_hash, upstream_of
from .schema import Plan
from .stage_dir import remove_write_leftovers, reset_stage_dir
from .state import RunState, save_resolved_recipe

__all__ = ["run_plan", "stage_hash", "default_backend_factory"]

BackendFactory = Callable[[dict[str, Any], Path], Any]


def run_plan(
    plan: Plan,
    output_dir: str | Path,
    *,
    resume: bool = False,
    backend_factory: BackendFactory = default_backend_factory,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run every stage of `plan` under `output_dir`; returns the final run.json contents.

    A failing stage is recorded as failed (with its error) and the exception propagates.
    Under a launcher (torchrun, deepspeed) rank 0 runs the stages and the other ranks serve its
    backend calls (`emdpo_plugin.dist`); they return an empty dict. Only the driver holds the
    run folder's lock (`lock.run_lock`): a second run into the folder fails at once.
    """
    run_dir = Path(output_dir)
    dist.init_distributed()
    if not dist.is_driver():
        dist.worker_loop(lambda: backend_factory(plan.recipe, run_dir))
        return {}
    if dist.launched() and plan.executor.kind != "local":
        dist.stop_workers("executor.kind: ray runs its own workers; do not start it under a launcher")
        raise RecipeError("executor.kind: ray starts its own workers; run it without torchrun/deepspeed")
    error = None
    try:
        with run_lock(run_dir):
            return _drive(plan, run_dir, resume, backend_factory, console or Console(highlight=False))
    except BaseException as exc:
        error = _error_text(exc)
        raise
    finally:
        dist.stop_workers(error)


def _drive(plan: Plan, run_dir: Path, resume: bool, backend_factory: BackendFactory, console: Console) -> dict[str, Any]:
    previous = RunState.load(run_dir)
    if previous is not None and not resume and previous.done_stages():
        raise EmdpoError(
            f"{run_dir} already holds a run with finished stages ({', '.join(previous.done_stages())}); "
            "pass --resume to continue it, or choose another --output-dir"
        )

    sources = {ps.spec.name: source_identity(ps, plan.recipe) for ps in plan.stages}
    reuse: set[str] = set()
    if resume and previous is not None:
        reuse = reusable_stages(plan, previous, sources)
        state = previous
        state.data.update(recipe=plan.name, recipe_path=plan.source, seed=plan.seed)
    else:
        state = RunState.new(run_dir, recipe=plan.name, recipe_path=plan.source, seed=plan.seed)

    run_dir.mkdir(parents=True, exist_ok=True)
    remove_write_leftovers(run_dir)
    save_resolved_recipe(run_dir, plan.recipe)
    state.set_plan([(ps.spec.name, ps.spec.trainer, None) for ps in plan.stages], keep=reuse)

    backend_cache: dict[str, Any] = {}
    state.data["executor"] = plan.executor.model_dump(mode="json")
    state.data["world_size"] = dist.world_size()
    state.save()
    build_backend = dist.driver_backend_factory(lambda: backend_factory(plan.recipe, run_dir))

    def shared_backend() -> Any:  # one backend per run, built on first use only
        if "backend" not in backend_cache:
            backend_cache["backend"] = build_backend()
        return backend_cache["backend"]

    def release_engines() -> None:  # after each stage: training engines' memory goes to the next stage
        release = getattr(backend_cache.get("backend"), "release_engine", None)
        if release is not None:
            release()
        if "executor" in backend_cache:
            backend_cache["executor"].release_engines()

    def shared_executor() -> Any:  # one executor per run (a Ray executor keeps its actors)
        if "executor" not in backend_cache:
            backend_cache["executor"] = make_executor(plan.executor, plan.recipe, run_dir)
        return backend_cache["executor"]

    logger = plan.typed.logger if plan.typed is not None else tracking.LoggerConfig()
    with runlog.run_logging(run_dir):
        tracker = tracking.Tracker(logger, run_name=f"{plan.name}-{run_dir.resolve().name}", config=plan.recipe,
                                   run_dir=run_dir) if logger.enabled else None
        tracking.set_active(tracker)
        try:
            _run_stages(plan, state, reuse, sources, run_dir, shared_backend, shared_executor, console,
                        release_engines)
        finally:
            tracking.set_active(None)
            if tracker is not None:
                tracker.close()
            if "executor" in backend_cache:
                backend_cache["executor"].close()
    return state.data


def _run_stages(plan: Plan, state: RunState, reuse: set[str], sources: dict[str, Any], run_dir: Path,
                shared_backend: Callable[[], Any], shared_executor: Callable[[], Any], console: Console,
                release_engines: Callable[[], None]) -> None:
    datasets: dict[str, Any] = {}  # dataset folders loaded once per run, shared by the stages that read them
    fingerprints = {name: output_fingerprint(state.stages[name]) for name in reuse}
    for ps in plan.stages:
        name = ps.spec.name
        if name in reuse:
            _say(console, f"skip {escape(name)} (done)")
            continue
        inputs = {slot: dict(state.stages[src].get("outputs") or {}) for slot, src in ps.spec.inputs.items()}
        key = stage_hash(plan, ps, {d: fingerprints[d] for d in upstream_of(plan, ps)}, sources[name])
        ctx = StageContext(
            run_dir=run_dir,
            stage_name=name,
            seed=plan.seed,
            recipe=copy.deepcopy(plan.recipe),
            key=key,
            _backend_factory=shared_backend,
            _executor_factory=shared_executor,
            _datasets=datasets,
        )
        _say(console, f"[bold]start[/] {escape(name)} ({escape(ps.spec.trainer)})")
        if tracking.active() is not None:
            tracking.active().stage = name
        state.mark_running(name, key)  # not done, so nothing reads its folder while it is rewritten
        removed = reset_stage_dir(run_dir / name, getattr(ps.trainer, "resume_state", ()) or ())
        if removed:
            _say(console, f"  removed what an unfinished or earlier attempt left in {escape(name)}/: "
                          f"{escape(', '.join(removed))}")
        started = time.perf_counter()
        try:
            outputs = _checked_outputs(name, ps.trainer().run(ctx, ps.config, inputs))
            validate_outputs(name, tuple(getattr(ps.trainer, "produces", ()) or ()), outputs)
        except BaseException as exc:
            seconds = time.perf_counter() - started
            state.mark_failed(name, _error_text(exc), seconds)
            _say(console, f"[bold red]failed[/] {escape(name)} after {runlog.duration(seconds)}: "
                          f"{escape(_error_text(exc))}")
            raise
        finally:
            release_engines()
        seconds = time.perf_counter() - started
        if ctx._executor is not None and ctx._executor.timeline:  # when each fit ran (Ray: side by side)
            state.stages[name]["fit_timeline"] = ctx._executor.timeline[:]
            ctx._executor.timeline.clear()
        state.mark_done(name, outputs, seconds)
        fingerprints[name] = state.stages[name]["fingerprint"]
        _say(console, f"[bold green]done[/] {escape(name)} in {runlog.duration(seconds)}")
        faults.point("runner.stage_done")


def _say(console: Console, markup: str) -> None:
    """A runner line: styled on the terminal, plain in run.log."""
    console.print(markup)
    runlog.info(markup, terminal=False)


def _checked_outputs(stage: str, outputs: Any) -> dict[str, Any]:
    """Outputs go into run.json and into later stages: they must be a JSON-able dict."""
    if outputs is None:
        return {}
    if not isinstance(outputs, dict):
        raise TypeError(f"stage {stage!r}: trainer returned {type(outputs).__name__}, expected a dict of outputs")
    try:
        return json.loads(json.dumps(outputs))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"stage {stage!r}: outputs are not JSON-serialisable: {exc}") from exc


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ")
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

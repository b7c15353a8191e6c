"""Host drift guard: what host/args.py restates must match the installed OpenRLHF.

OpenRLHF builds its CLI parsers under `if __name__ == "__main__"`, so they cannot be called;
the argument definitions are read from the CLI modules' source with `ast` instead (nothing is
imported or run). A failure names the key, so a host upgrade says which restated default or
name to revisit.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from emdpo_plugin.host import args as host_args

CLIS = ("train_sft", "train_dpo")  # the host trainers whose args make_args stands in for


class Opaque:
    """A default that is not a literal (e.g. a timestamp): only an override may restate it."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __repr__(self) -> str:
        return f"<{self.source}>"


def _default(node: ast.expr) -> Any:
    """A `default=` value: a literal, `int(...)`/`float(...)` of one (`int(1e8)`), else Opaque."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("int", "float") \
            and len(node.args) == 1 and not node.keywords:
        inner = _default(node.args[0])
        return inner if isinstance(inner, Opaque) else {"int": int, "float": float}[node.func.id](inner)
    try:
        return ast.literal_eval(node)
    except ValueError:
        return Opaque(ast.unparse(node))


def host_arguments(source: str) -> dict[str, Any]:
    """dest -> default of every `*.add_argument(...)` in a CLI module's source, as argparse would
    set them: the first definition of a dest wins, flags without `default=` take their action's."""
    out: dict[str, Any] = {}
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            continue
        kw = {k.arg: k.value for k in node.keywords}
        if "dest" in kw:
            dest = ast.literal_eval(kw["dest"])
        else:
            option = next(ast.literal_eval(a) for a in node.args if ast.literal_eval(a).startswith("--"))
            dest = option[2:].replace("-", "_")
        if "default" in kw:
            value = _default(kw["default"])
        else:
            action = ast.literal_eval(kw["action"]) if "action" in kw else None
            value = {"store_true": False, "store_false": True}.get(action)
        out.setdefault(dest, value)
    return out


def _same(ours: Any, host: Any) -> bool:
    return (not isinstance(host, Opaque) and isinstance(ours, bool) == isinstance(host, bool)
            and ours == host)


def drift(restated: Mapping[str, Any], names_only: Iterable[str], hosts: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per problem, each naming the key: a name no host CLI defines, a restated default
    that no CLI defining the key has, or a host argument our namespace would lack."""
    problems = []
    for key in [*restated, *names_only]:
        defaults = {cli: args[key] for cli, args in hosts.items() if key in args}
        if not defaults:
            problems.append(f"{key}: not an argument of the installed host ({', '.join(hosts)})")
        elif key in restated and not any(_same(restated[key], v) for v in defaults.values()):
            problems.append(f"{key}: restated default {restated[key]!r} differs from the host's {defaults} "
                            f"(update HOST_DEFAULTS, or move it to OVERRIDES if ours on purpose)")
    ours = {*restated, *names_only}
    for cli, args in hosts.items():
        problems += [f"{key}: {cli} argument that make_args leaves out of args" for key in args if key not in ours]
    return problems


def _host_root() -> Path:
    spec = importlib.util.find_spec("openrlhf")  # locates the package without importing it
    if spec is None or spec.origin is None:
        pytest.skip("OpenRLHF is not installed")
    return Path(spec.origin).parent


def test_restated_defaults_and_names_match_the_installed_host():
    root = _host_root()
    hosts = {cli: host_arguments((root / "cli" / f"{cli}.py").read_text()) for cli in CLIS}
    names_only = [*host_args.OVERRIDES, *host_args.CPU_DEFAULTS]
    assert drift(host_args.HOST_DEFAULTS, names_only, hosts) == []


def test_overrides_really_differ_from_the_host():
    """An override equal to a host default is a restated default: it belongs in HOST_DEFAULTS."""
    root = _host_root()
    hosts = {cli: host_arguments((root / "cli" / f"{cli}.py").read_text()) for cli in CLIS}
    same = [k for k, v in host_args.OVERRIDES.items() if any(_same(v, a.get(k)) for a in hosts.values())]
    assert same == []
    assert not set(host_args.OVERRIDES) & set(host_args.HOST_DEFAULTS)


def test_the_guard_names_a_drifted_key():
    source = '''
if __name__ == "__main__":
    parser.add_argument("--model.beta", type=float, default=0.2)
    parser.add_argument("--ckpt.max_mem", type=int, default=int(1e8))
    parser.add_argument("--ds.packing_samples", action="store_true")
    parser.add_argument("--muon.nesterov", action="store_true", default=True)
    parser.add_argument("--muon.no_nesterov", dest="muon.nesterov", action="store_false")
    parser.add_argument("--logger.wandb.run_name", default="exp_%s" % now())
    parser.add_argument("--new.flag", type=int, default=3)
'''
    args = host_arguments(source)
    assert args["ckpt.max_mem"] == 100_000_000 and args["ds.packing_samples"] is False
    assert args["muon.nesterov"] is True and isinstance(args["logger.wandb.run_name"], Opaque)
    restated = {"model.beta": 0.1, "ckpt.max_mem": int(1e8), "ds.packing_samples": False, "muon.nesterov": True,
                "logger.wandb.run_name": "emdpo", "gone.key": 1}
    problems = drift(restated, ["also.gone"], {"train_dpo": args})
    assert [p.split(":")[0] for p in problems] == ["model.beta", "logger.wandb.run_name", "gone.key", "also.gone",
                                                   "new.flag"]
    assert "0.1" in problems[0] and "0.2" in problems[0]
    assert drift({"ds.packing_samples": 0}, [], {"train_dpo": args})[0].startswith("ds.packing_samples:")


def test_get_batch_logps_reads_no_trainer_state():
    """weighted_dpo.sequence_logps calls `DPOTrainer._get_batch_logps(None, ...)` when scoring."""
    tree = ast.parse((_host_root() / "trainer" / "dpo_trainer.py").read_text())
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "DPOTrainer")
    method = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "_get_batch_logps")
    assert not [n for n in ast.walk(method) if isinstance(n, ast.Name) and n.id == "self"]

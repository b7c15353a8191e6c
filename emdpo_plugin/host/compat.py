"""Compatibility layer for stock OpenRLHF 0.11.2 + DeepSpeed 0.19.6 (the one place).

OpenRLHF assumes CUDA, flash-attn and a launcher. On a CUDA-less machine (CPU-only torch), on a
GPU machine without flash-attn, or in a plain `openrlhf run` without torchrun, a handful of
small, surgical adaptations are enough to run its SFT/DPO path unchanged. They are all made
here, by :func:`apply_cpu_compat`, and nowhere else in the plugin. No OpenRLHF code is copied;
each patch wraps or replaces one attribute and is documented below.

``apply_cpu_compat()`` is idempotent and returns whether the CPU-only adaptations (2, 3's shm
op, and the torch_adam default) are in force. On every machine it installs 1 when no real
flash-attn imports (transformers then never uses it; models run with ``sdpa``), 4, and 5 (so
one GPU works without a launcher). On a CPU machine it also installs 2 and 3:

1. ``flash_attn`` stand-ins (pure torch, real implementations).
   ``openrlhf.models.ring_attn_utils`` (imported by ``openrlhf.models``, hence by every
   trainer) does ``from flash_attn.bert_padding import index_first_axis, pad_input,
   rearrange, unpad_input`` and ``from flash_attn.utils.distributed import all_gather`` at
   import time. We register the modules ``flash_attn``, ``flash_attn.bert_padding``,
   ``flash_attn.utils`` and ``flash_attn.utils.distributed`` in ``sys.modules``. Each has a
   real ``__spec__`` (``importlib.machinery.ModuleSpec``) so
   ``importlib.util.find_spec("flash_attn")`` works instead of raising ``ValueError``.
   They carry no ``__version__``/``__file__`` and no ``flash-attn`` distribution exists, so
   ``transformers.utils.is_flash_attn_2_available()`` stays False and transformers never
   routes attention to them. ``flash_attn.ops`` is deliberately absent: OpenRLHF's
   ``log_probs_from_logits`` tries ``flash_attn.ops.triton.cross_entropy`` and falls back to
   pure torch on ``ImportError``, which is what we want. The functions follow flash-attn
   2.8's pure-torch semantics (``unpad_input`` returns the 5-tuple
   ``(unpadded, indices, cu_seqlens, max_seqlen, used_seqlens)``; ``rearrange`` is
   ``einops.rearrange``). Only the packed-sample / ring-attention code uses them; that path
   still needs real flash-attn kernels in transformers and is not supported on CPU.

2. ``torch.cuda`` calls made by OpenRLHF on the SFT/DPO path, made harmless on CPU:
   - ``torch.cuda.set_device(local_rank)`` in ``DeepspeedStrategy.setup_distributed``, and
     again inside the ``init_device_mesh("cuda", ...)`` call that follows it (CPU torch raises
     ``AttributeError``: no ``torch._C._cuda_setDevice``) -> no-op. With it the "cuda" device
     mesh builds fine over gloo on CPU; only its process groups are used (DP sampler).
   - ``torch.cuda.current_device()`` in ``DeepspeedStrategy.all_reduce``/``all_gather``
     (called every training step to average the log dict; raises "Torch not compiled with
     CUDA enabled") -> returns ``torch.device("cpu")``, which is what ``tensor.to(...)`` and
     ``torch.zeros(..., device=...)`` need there.
   - ``torch.cuda.synchronize()`` in ``torch_dist_barrier_and_cuda_sync`` (``save_model``,
     ``save_ckpt``) and the DeepSpeed state offload helpers -> no-op.
   ``torch.cuda.empty_cache()`` is already a no-op on CPU torch (it only acts when CUDA was
   initialised), so it is left alone. Nothing else in ``torch.cuda`` is touched;
   ``torch.cuda.is_available()`` still returns False.

3. DeepSpeed:
   - ``deepspeed.comm.torch.build_shm_op`` -> returns None. Otherwise the first
     ``deepspeed.init_distributed`` JIT-compiles the ``deepspeed_shm_comm`` C++ extension
     (about 75 s on 2 cores, needs g++/ninja) for intra-node shared-memory collectives,
     which a single CPU process never needs (gloo handles multi-process). The module is
     fetched with ``importlib.import_module("deepspeed.comm.torch")`` because
     ``import deepspeed.comm.torch as x`` yields the ``torch`` package (name shadowing in
     ``deepspeed.comm``).
   - Optimizer: DeepSpeed builds ``FusedAdam`` for the ``AdamW`` config OpenRLHF emits, and
     on CPU that JIT-compiles the CPU ``fused_adam`` op (another ~75 s). ``"torch_adam":
     True`` in the optimizer params makes DeepSpeed use ``torch.optim.AdamW`` (same numbers).
     :func:`cpu_optimizer_overrides` returns exactly those params; because OpenRLHF builds
     the optimizer dict inside ``DeepspeedStrategy.prepare``, we wrap
     ``DeepspeedStrategy.get_ds_train_config`` to merge them into
     ``ds_config["optimizer"]["params"]`` whenever an optimizer section is present (the
     wrapper only adds keys; it changes nothing else).

4. fp32 parameters: OpenRLHF's CLI restricts ``--ds.param_dtype`` to bf16/fp16 and
   ``openrlhf.utils.utils.convert_to_torch_dtype`` raises for anything else. It is read
   from ``args.ds.param_dtype`` by ``DeepspeedStrategy`` (ds config: bf16/fp16 sections are
   enabled only for "bf16"/"fp16", so "fp32" leaves both off = plain fp32 DeepSpeed) and
   passed as ``param_dtype=`` to ``Actor`` which calls ``convert_to_torch_dtype`` (a
   function-level import, so patching the module attribute takes effect). We wrap it to map
   "fp32"/"float32" to ``torch.float32`` and defer to the original for everything else.
   fp32 is the sensible default on CPU (bf16 matmuls are slow on most CPUs and lossy for
   tiny models).

5. Environment for single-process distributed init: ``deepspeed.init_distributed`` without
   ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` tries MPI
   discovery (``No module named 'mpi4py'``). We set ``RANK=0``, ``WORLD_SIZE=1``,
   ``LOCAL_RANK=0``, ``MASTER_ADDR=127.0.0.1`` and ``MASTER_PORT=<a free port>`` only for
   the variables that are unset, so torchrun / the deepspeed launcher still win.
   ``DeepspeedStrategy.setup_distributed`` is wrapped to retry on a fresh port when the port
   we chose was taken by another process before the rendezvous bound it (EADDRINUSE); a
   launcher's port is never replaced.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import socket
import sys
import types
from typing import Any

import torch

__all__ = [
    "apply_cpu_compat",
    "cpu_optimizer_overrides",
    "is_applied",
    "ensure_dist_env",
    "index_first_axis",
    "index_put_first_axis",
    "pad_input",
    "unpad_input",
    "all_gather",
]

_APPLIED = False
_PATCH_MARK = "_emdpo_cpu_compat"


# ---------------------------------------------------------------------------------------------
# 1. flash_attn stand-ins
# ---------------------------------------------------------------------------------------------

def _rearrange(tensor, pattern: str, **axes_lengths):
    from einops import rearrange

    return rearrange(tensor, pattern, **axes_lengths)


def index_first_axis(input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``input[indices]`` along the first axis (differentiable), as flash_attn.bert_padding."""
    return torch.index_select(input, 0, indices)


def index_put_first_axis(values: torch.Tensor, indices: torch.Tensor, first_axis_dim: int) -> torch.Tensor:
    """A zero tensor of first dimension ``first_axis_dim`` with ``values`` scattered to rows ``indices``."""
    output = values.new_zeros((first_axis_dim, *values.shape[1:]))
    return output.index_put((indices,), values)


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask: torch.Tensor | None = None):
    """Drop padded positions (flash-attn 2.8 semantics).

    hidden_states: (batch, seqlen, ...); attention_mask: (batch, seqlen), 1 = valid.
    Returns (hidden_states[valid] of shape (total_nnz, ...), indices into the flattened
    (batch*seqlen) axis, cu_seqlens (batch+1, int32), max_seqlen_in_batch (int),
    used_seqlens_in_batch (batch, int32)).
    """
    all_masks = (attention_mask + unused_mask) if unused_mask is not None else attention_mask
    seqlens_in_batch = all_masks.sum(dim=-1, dtype=torch.int32)
    used_seqlens_in_batch = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = int(seqlens_in_batch.max().item()) if seqlens_in_batch.numel() else 0
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens_in_batch, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return (index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen_in_batch, used_seqlens_in_batch)


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of :func:`unpad_input`: (total_nnz, ...) -> (batch, seqlen, ...), zeros at pads."""
    output = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return output.reshape(batch, seqlen, *hidden_states.shape[1:])


class _AllGatherFunc(torch.autograd.Function):
    """Concatenate ``input_`` from every rank of ``process_group`` along dim 0.

    Backward sums the gradient over ranks and returns this rank's slice (a reduce-scatter),
    as flash_attn.utils.distributed.AllGatherFunc does. Uses list all_gather / all_reduce so
    it also works on gloo.
    """

    @staticmethod
    def forward(ctx, input_, process_group):
        import torch.distributed as dist

        ctx.process_group = process_group
        world_size = dist.get_world_size(process_group)
        if world_size == 1:
            return input_.contiguous()
        parts = [torch.empty_like(input_).contiguous() for _ in range(world_size)]
        dist.all_gather(parts, input_.contiguous(), group=process_group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_output):
        import torch.distributed as dist

        world_size = dist.get_world_size(ctx.process_group)
        if world_size == 1:
            return grad_output, None
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, group=ctx.process_group)
        rank = dist.get_rank(ctx.process_group)
        return grad.chunk(world_size, dim=0)[rank].contiguous(), None


def all_gather(input_: torch.Tensor, process_group) -> torch.Tensor:
    return _AllGatherFunc.apply(input_, process_group)


def _new_module(name: str, *, package: bool, attrs: dict[str, Any] | None = None) -> types.ModuleType:
    spec = importlib.machinery.ModuleSpec(name, loader=None, origin="emdpo_plugin cpu stand-in",
                                          is_package=package)
    mod = importlib.util.module_from_spec(spec)
    if package:
        mod.__path__ = []  # a package with no submodules on disk: flash_attn.ops etc. -> ImportError
        spec.submodule_search_locations = []
    mod.__doc__ = f"Pure-torch CPU stand-in installed by {__name__} (not the flash-attn package)."
    setattr(mod, _PATCH_MARK, True)
    for k, v in (attrs or {}).items():
        setattr(mod, k, v)
    return mod


def _install_flash_attn_standins() -> None:
    existing = sys.modules.get("flash_attn")
    if existing is not None and not getattr(existing, _PATCH_MARK, False):
        return  # a real flash_attn is already imported; leave it alone
    if existing is None:
        try:
            real = importlib.util.find_spec("flash_attn") is not None
        except (ImportError, ValueError):
            real = False
        if real:  # an installed flash_attn wins if it imports (a CUDA-only build may not on CPU)
            try:
                importlib.import_module("flash_attn.bert_padding")
                importlib.import_module("flash_attn.utils.distributed")
                return
            except Exception:  # noqa: BLE001 - any failure: fall back to the stand-ins
                for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
                    del sys.modules[name]
    root = _new_module("flash_attn", package=True)
    bert_padding = _new_module("flash_attn.bert_padding", package=False, attrs={
        "index_first_axis": index_first_axis,
        "index_put_first_axis": index_put_first_axis,
        "pad_input": pad_input,
        "unpad_input": unpad_input,
        "rearrange": _rearrange,
    })
    utils = _new_module("flash_attn.utils", package=True)
    distributed = _new_module("flash_attn.utils.distributed", package=False, attrs={"all_gather": all_gather})
    root.bert_padding = bert_padding
    root.utils = utils
    utils.distributed = distributed
    sys.modules.update({
        "flash_attn": root,
        "flash_attn.bert_padding": bert_padding,
        "flash_attn.utils": utils,
        "flash_attn.utils.distributed": distributed,
    })


# ---------------------------------------------------------------------------------------------
# 2. torch.cuda calls
# ---------------------------------------------------------------------------------------------

def _cpu_set_device(device) -> None:  # noqa: ARG001 - signature of torch.cuda.set_device
    return None


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _cpu_synchronize(device=None) -> None:  # noqa: ARG001
    return None


def _patch_torch_cuda() -> None:
    for name, fn in (("set_device", _cpu_set_device), ("current_device", _cpu_current_device),
                     ("synchronize", _cpu_synchronize)):
        current = getattr(torch.cuda, name, None)
        if getattr(current, _PATCH_MARK, False):
            continue
        setattr(fn, _PATCH_MARK, True)
        fn.__wrapped__ = current
        setattr(torch.cuda, name, fn)


# ---------------------------------------------------------------------------------------------
# 3. DeepSpeed
# ---------------------------------------------------------------------------------------------

# model.ds.torch_adam (set by the backend), else EMDPO_TORCH_ADAM=1/0 (covers the tiny-model SFT,
# which runs before any backend exists), else: only on CPU
TORCH_ADAM: bool | None = {"1": True, "0": False}.get(os.environ.get("EMDPO_TORCH_ADAM", ""))


def cpu_optimizer_overrides() -> dict[str, Any]:
    """Params to merge into the DeepSpeed ``optimizer.params``.

    ``torch_adam: True`` makes DeepSpeed use ``torch.optim.AdamW`` instead of JIT-compiling
    FusedAdam / DeepSpeedCPUAdam (about 75 s each on 2 cores; on a GPU the fused op needs nvcc).
    Default: on CPU only; ``model.ds.torch_adam`` decides when set.
    """
    use = (not torch.cuda.is_available()) if TORCH_ADAM is None else TORCH_ADAM
    return {"torch_adam": True} if use else {}


def _no_shm_op():
    return None


def _patch_shm_op() -> None:
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    if not getattr(ds_comm_torch.build_shm_op, _PATCH_MARK, False):
        setattr(_no_shm_op, _PATCH_MARK, True)
        _no_shm_op.__wrapped__ = ds_comm_torch.build_shm_op
        ds_comm_torch.build_shm_op = _no_shm_op


def _patch_ds_optimizer() -> None:
    from openrlhf.utils.deepspeed.deepspeed import DeepspeedStrategy

    original = DeepspeedStrategy.get_ds_train_config
    if getattr(original, _PATCH_MARK, False):
        return

    def get_ds_train_config(self, *args, **kwargs):
        ds_config = original(self, *args, **kwargs)
        optimizer = ds_config.get("optimizer")
        if isinstance(optimizer, dict) and optimizer.get("type", "").lower() in ("adamw", "adam"):
            params = optimizer.setdefault("params", {})
            for key, value in cpu_optimizer_overrides().items():
                params.setdefault(key, value)
        return ds_config

    setattr(get_ds_train_config, _PATCH_MARK, True)
    get_ds_train_config.__wrapped__ = original
    get_ds_train_config.__doc__ = original.__doc__
    DeepspeedStrategy.get_ds_train_config = get_ds_train_config


# ---------------------------------------------------------------------------------------------
# 4. fp32 param dtype
# ---------------------------------------------------------------------------------------------

def _patch_param_dtype() -> None:
    import openrlhf.utils.utils as orl_utils

    original = orl_utils.convert_to_torch_dtype
    if getattr(original, _PATCH_MARK, False):
        return

    def convert_to_torch_dtype(param_dtype):
        if param_dtype in ("fp32", "float32"):
            return torch.float32
        return original(param_dtype)

    setattr(convert_to_torch_dtype, _PATCH_MARK, True)
    convert_to_torch_dtype.__wrapped__ = original
    convert_to_torch_dtype.__doc__ = original.__doc__
    orl_utils.convert_to_torch_dtype = convert_to_torch_dtype


# ---------------------------------------------------------------------------------------------
# 5. single-process distributed env
# ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_dist_env() -> dict[str, str]:
    """Set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for one process where unset.

    Returns the variables it set (empty when a launcher already provided them).
    """
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    set_now = {}
    for key, value in defaults.items():
        if not os.environ.get(key):
            os.environ[key] = set_now[key] = value
    if not os.environ.get("MASTER_PORT"):
        os.environ["MASTER_PORT"] = set_now["MASTER_PORT"] = str(_free_port())
        _OWN_PORT.add(os.environ["MASTER_PORT"])
    return set_now


_OWN_PORT: set[str] = set()  # MASTER_PORT values this module chose (not a launcher's)


def _patch_setup_distributed() -> None:
    """Retry single-process rendezvous on a fresh port if the one we picked was taken meanwhile.

    A free port found at start-up can be grabbed by another process before the TCP store binds
    it (seen with several jobs on one machine). Only ports this module chose are replaced."""
    from openrlhf.utils.deepspeed import DeepspeedStrategy

    original = DeepspeedStrategy.setup_distributed
    if getattr(original, "_emdpo_patched", False):
        return

    def setup_distributed(self, *args, **kwargs):
        for attempt in range(5):
            try:
                return original(self, *args, **kwargs)
            except torch.distributed.DistNetworkError as exc:
                if "EADDRINUSE" not in str(exc) or os.environ.get("MASTER_PORT") not in _OWN_PORT or attempt == 4:
                    raise
                os.environ["MASTER_PORT"] = str(_free_port())
                _OWN_PORT.add(os.environ["MASTER_PORT"])

    setup_distributed._emdpo_patched = True
    DeepspeedStrategy.setup_distributed = setup_distributed


# ---------------------------------------------------------------------------------------------

def is_applied() -> bool:
    return _APPLIED


def apply_cpu_compat() -> bool:
    """Install the CPU adaptations described in the module docstring.

    Idempotent. Returns True when the CPU-only adaptations are in force (no CUDA), False on a
    GPU machine, where only the device-independent ones are made. Call it before importing
    ``openrlhf.models`` / trainers (importing them needs flash_attn or the stand-ins); calling
    it later is also fine.
    """
    global _APPLIED
    cpu = not torch.cuda.is_available()
    if not _APPLIED:
        _install_flash_attn_standins()  # a real flash_attn that imports is left alone
        _patch_ds_optimizer()
        _patch_param_dtype()
        _patch_setup_distributed()
        if cpu:
            _patch_torch_cuda()
            _patch_shm_op()
        _APPLIED = True
    ensure_dist_env()  # a previous run may have been torn down with its env; cheap
    return cpu

"""The host adapted: the one place the plugin patches or wraps OpenRLHF 0.11.2 and DeepSpeed.

- ``compat.py``: :func:`~emdpo_plugin.host.compat.apply_cpu_compat`, small patches that let the
  stock host run where it does not expect to: pure-torch ``flash_attn`` stand-ins (OpenRLHF
  imports them at import time), ``fp32`` accepted as a param dtype, single-process distributed
  environment defaults; without CUDA also no-op ``torch.cuda`` device calls and DeepSpeed with
  ``torch_adam`` and no shared-memory op (no JIT compiles). Each patch is documented there.
- ``args.py``: :func:`~emdpo_plugin.host.args.make_args`, the argument namespace OpenRLHF's
  trainers and strategy read, built from Python because its CLI parsers cannot be imported
  (``HOST_DEFAULTS`` restates theirs, ``OVERRIDES`` holds ours; tests/test_host_drift.py checks
  them against the installed host).
- ``optimizer.py``: :func:`~emdpo_plugin.host.optimizer.use_torch_optimizer`, a ``torch.optim``
  optimiser (RMSprop, the paper's) in place of the AdamW section OpenRLHF writes into the
  DeepSpeed config, by wrapping one strategy object's ``get_ds_train_config``.
- ``tiny_sft.py``: :func:`~emdpo_plugin.host.tiny_sft.sft_through_openrlhf`, the tiny model's SFT
  through OpenRLHF's own SFT path (the model itself is built in ``emdpo_plugin.models.tiny``).

The backends (``backends/openrlhf_backend.py``, ``backends/weighted_dpo.py``), the Ray executor
and the tiny model use the host through these modules. Every process-wide patch is made here;
outside, the host is only subclassed (``WeightedDPOTrainer``).
"""

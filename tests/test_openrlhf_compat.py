"""The CPU compatibility layer for stock OpenRLHF, the args helper, and the tiny SFT'd LM."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import time

import pytest
import torch

from emdpo_plugin.host.compat import apply_cpu_compat, cpu_optimizer_overrides

needs_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="the compat layer is a no-op on CUDA machines")


@pytest.fixture(scope="module")
def compat():
    return apply_cpu_compat()


# --- (a) imports and patches -------------------------------------------------------------------

@needs_cpu
def test_apply_is_idempotent_and_openrlhf_imports(compat):
    assert compat is True
    assert apply_cpu_compat() is True  # second call: no-op, same answer
    mod = importlib.import_module("openrlhf.trainer.dpo_trainer")
    assert hasattr(mod, "DPOTrainer")
    importlib.import_module("openrlhf.trainer.sft_trainer")
    spec = importlib.util.find_spec("flash_attn")
    assert spec is not None and spec.name == "flash_attn"
    assert importlib.util.find_spec("flash_attn.bert_padding") is not None
    from transformers.utils import is_flash_attn_2_available

    assert is_flash_attn_2_available() is False
    # OpenRLHF's log_probs_from_logits relies on flash_attn.ops being absent (falls back to torch)
    with pytest.raises(ImportError):
        importlib.import_module("flash_attn.ops.triton.cross_entropy")


@needs_cpu
def test_cuda_deepspeed_dtype_and_env_patches(compat):
    torch.cuda.set_device(0)
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert torch.cuda.is_available() is False  # untouched
    assert torch.zeros(2).to(torch.cuda.current_device()).device.type == "cpu"

    ds_torch = importlib.import_module("deepspeed.comm.torch")
    assert ds_torch.build_shm_op() is None

    from openrlhf.utils.utils import convert_to_torch_dtype

    assert convert_to_torch_dtype("fp32") is torch.float32
    assert convert_to_torch_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError):
        convert_to_torch_dtype("fp8")

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        assert os.environ.get(key), key
    assert int(os.environ["MASTER_PORT"]) > 0

    assert cpu_optimizer_overrides() == {"torch_adam": True}
    from openrlhf.utils import get_strategy

    from emdpo_plugin.host.args import make_args

    strategy = get_strategy(make_args(train__batch_size=4, train__micro_batch_size=2))
    cfg = strategy.get_ds_train_config(optim_dict={"type": "AdamW", "params": {"lr": 1e-3}})
    assert cfg["optimizer"]["params"] == {"lr": 1e-3, "torch_adam": True}
    assert "optimizer" not in strategy.get_ds_train_config()  # model-loading path: untouched
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False  # fp32 on CPU


def test_noop_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert apply_cpu_compat() is False
    assert cpu_optimizer_overrides() == {}


def test_make_args_defaults_and_overrides():
    from emdpo_plugin.host.args import flatten_args, make_args

    args = make_args({"model.model_name_or_path": "/m", "ds.lora.rank": 8}, train__batch_size=4, cpu=True)
    assert args.ds.zero_stage == 0 and args.ds.param_dtype == "fp32" and args.ds.attn_implementation == "sdpa"
    assert args.ds.lora.rank == 8 and args.train.batch_size == 4
    assert args.ref.model_name_or_path == "/m"  # as train_dpo.py does
    assert args.logger.wandb.key is None and args.eval.steps == -1 and args.local_rank == -1
    gpu = make_args(cpu=False)
    assert gpu.ds.zero_stage == 2 and gpu.ds.param_dtype == "bf16"
    with pytest.raises(KeyError):
        make_args({"ds.zero_stag": 1})
    assert make_args({"model.em_weight": 1.0}, strict=False).model.em_weight == 1.0
    with pytest.raises(KeyError):
        make_args({"ds": 1}, strict=False)
    assert flatten_args(args)["ds.lora.rank"] == 8


# --- (b) bert_padding stand-ins -----------------------------------------------------------------

@needs_cpu
def test_bert_padding_round_trip(compat):
    from flash_attn.bert_padding import index_first_axis, pad_input, rearrange, unpad_input

    g = torch.Generator().manual_seed(0)
    batch, seqlen, hidden = 3, 6, 4
    x = torch.randn(batch, seqlen, hidden, generator=g, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]])  # right- and left-padded

    unpadded, indices, cu_seqlens, max_seqlen, used = unpad_input(x, mask)
    assert unpadded.shape == (int(mask.sum()), hidden)
    assert indices.tolist() == [i for i, m in enumerate(mask.flatten().tolist()) if m]
    assert cu_seqlens.tolist() == [0, 6, 9, 13] and cu_seqlens.dtype == torch.int32
    assert max_seqlen == 6 and used.tolist() == [6, 3, 4]

    back = pad_input(unpadded, indices, batch, seqlen)
    assert back.shape == x.shape
    assert torch.equal(back, x * mask.unsqueeze(-1))  # valid positions restored, pads zero
    back.sum().backward()
    assert torch.equal(x.grad, mask.unsqueeze(-1).float().expand_as(x))

    rows = torch.arange(20.0).reshape(10, 2)
    idx = torch.tensor([7, 0, 3, 3])
    assert torch.equal(index_first_axis(rows, idx), rows[[7, 0, 3, 3]])
    assert rearrange(torch.zeros(2, 3, 5), "b s ... -> (b s) ...").shape == (6, 5)

    # through the host's own code path (packing helpers of openrlhf.models.ring_attn_utils)
    from openrlhf.models.ring_attn_utils import gather_and_pad_tensor, unpad_and_slice_tensor

    seqs = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    m2 = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    packed, position_ids, rolled, pad_len, idx2 = unpad_and_slice_tensor(seqs, m2, None)
    assert packed.tolist() == [[5, 6, 7, 8, 9]] and position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert rolled.tolist() == [[6, 7, 0, 9, 0]] and pad_len == 0
    assert gather_and_pad_tensor(packed, None, pad_len, idx2, 2, 4).tolist() == (seqs * m2).tolist()


def test_tokenizer_training_is_deterministic():
    from emdpo_plugin.models.tiny import _train_tokenizer, demo_sentences

    texts = demo_sentences(120, seed=3)
    assert texts == demo_sentences(120, seed=3) and len(set(texts)) == 120
    a, b = _train_tokenizer(texts, 500, 128), _train_tokenizer(texts, 500, 128)
    assert a.get_vocab() == b.get_vocab()
    assert a.decode(a.encode(texts[0], add_special_tokens=False)) == texts[0]
    assert a.pad_token == "<pad>" and a.eos_token == "</s>" and a.bos_token == "<s>"


def test_build_refuses_foreign_non_empty_dir(tmp_path):
    from emdpo_plugin.models import build_tiny_lm

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        build_tiny_lm(["a b c"], tmp_path / "m")
    assert (tmp_path / "m" / "keep.txt").read_text() == "user data"


# --- (c) the tiny LM, SFT'd through OpenRLHF -----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, compat):
    from emdpo_plugin.models import build_tiny_lm, demo_sentences

    texts = demo_sentences(200, seed=0)
    out = tmp_path_factory.mktemp("tiny") / "lm"
    t0 = time.perf_counter()
    path = build_tiny_lm(texts, out, seed=0)
    return path, texts, time.perf_counter() - t0


@pytest.mark.slow
@needs_cpu
def test_build_tiny_lm_sft_loads_offline_and_generates(tiny_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emdpo_plugin.models import MARKER, build_tiny_lm, is_built, read_build_info
    from emdpo_plugin.host.tiny_sft import mean_nll

    path, texts, seconds = tiny_lm
    assert is_built(path)
    assert seconds < 300, f"tiny build took {seconds:.0f} s (about 20 s on an idle 2-core machine)"
    info = read_build_info(path)
    sft = info["sft"]
    assert sft["steps"] == info["config"]["sft_steps"] == len(sft["step_losses"])
    # the SFT learned: held numbers from the OpenRLHF run (before/after, first/last steps)
    assert sft["loss_after"] < 0.5 * sft["loss_before"], sft
    first, last = sft["step_losses"][:10], sft["step_losses"][-10:]
    assert sum(last) / len(last) < 0.5 * sum(first) / len(first)
    assert not list(path.parent.glob(f".{path.name}.building-*"))  # no leftovers

    # idempotent: a second call returns at once and leaves the folder alone
    mtime = (path / MARKER).stat().st_mtime_ns
    t0 = time.perf_counter()
    assert build_tiny_lm(texts, path) == path
    assert time.perf_counter() - t0 < 1.0 and (path / MARKER).stat().st_mtime_ns == mtime

    # loads with the plain HF auto classes; the saved weights are the trained ones
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    assert model.config.use_cache is True and model.dtype == torch.float32
    assert tok.pad_token_id == model.config.pad_token_id and tok.eos_token_id == model.config.eos_token_id
    assert mean_nll(model, tok, texts, 256) == pytest.approx(sft["loss_after"], rel=1e-4)

    enc = tok(["the movie was"], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=30, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, enc["input_ids"].shape[1]:]
    assert len(new) > 0
    text = tok.decode(new, skip_special_tokens=True)
    vocab = {w for t in texts for w in t.split()}
    assert any(w in vocab for w in text.split()), text
    out2 = model.generate(**enc, max_new_tokens=30, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(out, out2)

    # a fresh interpreter with the hub switched off and without the plugin loads it too
    code = (
        "import sys\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation='sdpa')\n"
        "print(m.config.model_type, len(t))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-2:] == ["llama", str(len(tok))]


@pytest.mark.slow
@needs_cpu
def test_all_gather_standin_in_the_live_group(tiny_lm):
    import torch.distributed as dist
    from flash_attn.utils.distributed import all_gather

    assert dist.is_initialized()  # the tiny build ran OpenRLHF's setup_distributed
    x = torch.arange(6.0).reshape(3, 2).requires_grad_()
    y = all_gather(x, dist.group.WORLD)
    assert torch.equal(y, x.detach().repeat(dist.get_world_size(), 1))
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, float(dist.get_world_size())))

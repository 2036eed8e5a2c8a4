"""Per-device performance choices: each is made by a selection function tested for CPU and CUDA,
and the CPU path keeps its numbers (fused AdamW, the gradient check, SDPA kernels, liger head)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.nn.attention import SDPBackend

from dpo_lightning import optim
from dpo_lightning.data import PairCollator
from dpo_lightning.models import load_causal_lm
from dpo_lightning.modules import PreferenceModule, attention, liger_head, logprobs
from dpo_lightning.modules.logprobs import ChunkedTargetLogProbs, LogProbSelector, target_logprobs
from dpo_lightning.optim import fused_kernel_allowed, gradient_norm_and_finite, with_fused_kernel
from conftest import NoHostReads, tiny_spec
from test_logprobs import rows

NO_CHOICE = [{"fused": None, "foreach": None}]


# -- fused AdamW -----------------------------------------------------------------------------
def test_fused_kernel_is_chosen_only_on_cuda_without_a_scaler_or_deepspeed() -> None:
    assert fused_kernel_allowed({"cuda"}, grad_scaler=False, deepspeed=False, groups=NO_CHOICE)
    assert not fused_kernel_allowed({"cpu"}, grad_scaler=False, deepspeed=False, groups=NO_CHOICE)
    assert not fused_kernel_allowed({"cuda", "cpu"}, grad_scaler=False, deepspeed=False, groups=NO_CHOICE)
    assert not fused_kernel_allowed({"cuda"}, grad_scaler=True, deepspeed=False, groups=NO_CHOICE)  # 16-mixed
    assert not fused_kernel_allowed({"cuda"}, grad_scaler=False, deepspeed=True, groups=NO_CHOICE)


@pytest.mark.parametrize("asked", [{"fused": False, "foreach": None}, {"fused": None, "foreach": True}])
def test_a_recipe_that_names_an_implementation_keeps_it(asked: dict) -> None:
    assert not fused_kernel_allowed({"cuda"}, grad_scaler=False, deepspeed=False, groups=[asked])


def test_cpu_parameters_keep_the_very_same_optimizer() -> None:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))], lr=1e-3)
    assert with_fused_kernel(optimizer) is optimizer
    assert optimizer.defaults["fused"] is None and optimizer.defaults["foreach"] is None


def test_rebuilt_optimizer_keeps_groups_and_settings_and_steps_like_foreach(monkeypatch) -> None:
    """The rebuild itself, run on CPU (PyTorch has a CPU fused Adam) by forcing the selection."""
    monkeypatch.setattr(optim, "fused_kernel_allowed", lambda *a, **k: True)
    g = torch.Generator().manual_seed(0)
    first = [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]
    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    groups = lambda ps: [{"params": [ps[0]], "lr": 1e-2}, {"params": [ps[1]], "lr": 1e-3, "weight_decay": 0.5}]  # noqa: E731
    plain = torch.optim.AdamW(groups(first), betas=(0.8, 0.9), weight_decay=0.1)
    fused = with_fused_kernel(torch.optim.AdamW(groups(second), betas=(0.8, 0.9), weight_decay=0.1))
    assert type(fused) is torch.optim.AdamW and fused.defaults["fused"] is True
    for a, b in zip(plain.param_groups, fused.param_groups):
        assert b["fused"] is True and b["foreach"] is None
        assert {k: v for k, v in a.items() if k not in ("params", "fused", "foreach")} == \
            {k: v for k, v in b.items() if k not in ("params", "fused", "foreach")}
        assert all(x is y for x, y in zip(b["params"], b["params"]))
    assert [p for grp in fused.param_groups for p in grp["params"]][0] is second[0]
    for _ in range(3):
        for ps in (first, second):
            for p in ps:
                p.grad = torch.sin(p.detach() * 3)
        plain.step()
        fused.step()
    for a, b in zip(first, second):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_module_on_cpu_gets_the_configured_optimizer_and_fingerprint(tokenizer) -> None:
    module = PreferenceModule(model=tiny_spec(), optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-4))
    module.trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False)
    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    assert optimizer.defaults["fused"] is None and optimizer.defaults["foreach"] is None
    assert module.optimizer_id["optimizer"].startswith("AdamW{") and '"fused": null' in module.optimizer_id["optimizer"]


# -- the per-step gradient check -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gradient_norm_equals_the_per_tensor_formula_bitwise(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(30, 7, generator=g).to(dtype), torch.randn(11, generator=g).to(dtype)]
    norm, finite = gradient_norm_and_finite(grads)
    before = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x.detach().float()) for x in grads]))
    assert torch.equal(norm, before) and norm.dtype == torch.float32
    assert bool(finite)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_any_nonfinite_entry_is_caught(bad: float) -> None:
    grads = [torch.ones(3, 3), torch.ones(4)]
    grads[1][2] = bad
    assert not bool(gradient_norm_and_finite(grads)[1])


def test_large_finite_gradients_are_finite_though_their_norm_overflows() -> None:
    grads = [torch.full((4,), 1e30)]
    norm, finite = gradient_norm_and_finite(grads)
    assert torch.isinf(norm) and bool(finite)


def test_row_ids_are_kept_as_tensors_until_read(tokenizer) -> None:
    module = PreferenceModule(model=tiny_spec())
    module._rows_since_step = [torch.tensor([4, 1]), 7, torch.tensor([2])]
    assert module.pending_rows() == [4, 1, 7, 2]
    assert module._rows_since_step == []


# -- attention kernels -----------------------------------------------------------------------
def test_sdpa_backends_leave_cpu_alone_and_drop_cudnn_on_cuda() -> None:
    assert attention.sdpa_backends("cpu") is None
    chosen = attention.sdpa_backends("cuda")
    assert SDPBackend.CUDNN_ATTENTION not in chosen
    assert chosen[:2] == (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)


def test_cpu_selector_calls_run_without_a_kernel_restriction(tokenizer, monkeypatch) -> None:
    entered: list[object] = []
    monkeypatch.setattr(attention, "sdpa_kernel", lambda backends: entered.append(backends))
    model = load_causal_lm(tiny_spec(), tokenizer)
    batch = PairCollator(pad_token_id=tokenizer.pad_token_id)(rows())
    with torch.no_grad():
        LogProbSelector("chunked")(model, batch)
    assert entered == []


# -- LM head chunk ---------------------------------------------------------------------------
class HeadOnly(torch.nn.Module):
    """Just what ``positions_per_chunk`` reads: an output embedding of ``vocab`` rows."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(1, vocab, bias=False)

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.head


@pytest.mark.parametrize(("vocab", "cpu_positions"), [(2000, 1024), (32000, 262), (151936, 64), (2**23, 64)])
def test_auto_chunk_holds_about_32_mb_of_logits_on_cpu_and_1024_positions_elsewhere(vocab: int, cpu_positions: int) -> None:
    model = HeadOnly(vocab)
    selector = LogProbSelector("chunked")
    assert selector.chunk_size == "auto"
    assert selector.positions_per_chunk(model, torch.device("cpu")) == cpu_positions
    assert selector.positions_per_chunk(model, torch.device("cuda")) == 1024
    assert LogProbSelector("chunked", 7).positions_per_chunk(model, torch.device("cpu")) == 7


def test_selector_hands_the_resolved_chunk_to_the_head_and_it_leaves_the_values_alone(tokenizer, monkeypatch) -> None:
    model = load_causal_lm(tiny_spec(seed=3), tokenizer)
    batch = PairCollator(pad_token_id=tokenizer.pad_token_id)(rows())
    assert model.get_output_embeddings().weight.shape[0] == 512  # 2**23 // 512 positions, capped at 1024
    seen: list[int] = []
    real = logprobs.target_logprobs
    monkeypatch.setattr(logprobs, "target_logprobs", lambda h, w, y, chunk: seen.append(chunk) or real(h, w, y, chunk))
    with torch.no_grad():
        auto = LogProbSelector("chunked")(model, batch)
        small = LogProbSelector("chunked", 3)(model, batch)
    assert seen == [1024, 3]
    torch.testing.assert_close(auto.sums, small.sums, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -5, "big", True, 2.5])
def test_a_bad_chunk_size_names_its_key(tokenizer, bad: object) -> None:
    model = load_causal_lm(tiny_spec(), tokenizer)
    with pytest.raises(ValueError, match=r"model\.init_args\.logprob_chunk_size must be auto or an integer >= 1"):
        LogProbSelector("chunked", bad).check(model)  # type: ignore[arg-type]


# -- liger head ------------------------------------------------------------------------------
def test_liger_head_only_for_gradient_free_cuda_passes_with_liger_installed(monkeypatch) -> None:
    monkeypatch.setattr(liger_head, "liger_installed", lambda: True)
    assert liger_head.use_liger_head("cuda", needs_grad=False)
    assert not liger_head.use_liger_head("cuda", needs_grad=True)
    assert not liger_head.use_liger_head("cpu", needs_grad=False)
    monkeypatch.setattr(liger_head, "liger_installed", lambda: False)
    assert not liger_head.use_liger_head("cuda", needs_grad=False)


def test_cpu_head_falls_back_to_the_chunked_function_even_with_liger_present(monkeypatch) -> None:
    monkeypatch.setattr(liger_head, "liger_installed", lambda: True)
    monkeypatch.setattr(logprobs, "liger_target_logprobs", lambda *a: pytest.fail("liger called on CPU"))
    g = torch.Generator().manual_seed(2)
    hidden, weight, targets = torch.randn(9, 8, generator=g), torch.randn(20, 8, generator=g), torch.arange(9)
    with torch.no_grad():
        got = target_logprobs(hidden, weight, targets, 4)
    assert torch.equal(got, ChunkedTargetLogProbs.apply(hidden, weight, targets, 4))


def test_liger_is_not_imported_on_the_cpu_path(tokenizer) -> None:
    import sys

    model = load_causal_lm(tiny_spec(), tokenizer)
    batch = PairCollator(pad_token_id=tokenizer.pad_token_id)(rows())
    LogProbSelector("chunked")(model, batch)
    assert "liger_kernel" not in sys.modules


# -- no host syncs in the step's bookkeeping ---------------------------------------------------
def test_sync_free_mean_is_chosen_off_the_cpu_and_equals_meanmetric(monkeypatch) -> None:
    from torchmetrics import MeanMetric

    from dpo_lightning.metrics import SyncFreeMean

    assert not SyncFreeMean.sync_free("cpu") and SyncFreeMean.sync_free("cuda")
    monkeypatch.setattr(SyncFreeMean, "sync_free", staticmethod(lambda device_type: True))  # as on CUDA
    values = [torch.tensor([0.5, -1.25, 3.0]), torch.tensor([2.0, float("nan"), 1.0]), torch.tensor(4.0)]
    weights = [3.0, 2.0, torch.tensor(0.5)]
    ours, theirs = SyncFreeMean(), MeanMetric(nan_strategy="ignore")
    with NoHostReads():
        for v, w in zip(values, weights):
            ours.update(v, w)
    for v, w in zip(values, weights):
        theirs.update(v, w)
    assert torch.equal(ours.mean_value, theirs.mean_value) and torch.equal(ours.weight, theirs.weight)
    assert float(ours.compute()) == pytest.approx((3 * 2.25 + 2 * 3.0 + 0.5 * 4.0) / (3 * 3 + 2 * 2 + 0.5))


def test_gradient_check_reads_nothing_on_the_host() -> None:
    grads = [torch.randn(5, 3), torch.randn(2)]
    with NoHostReads():
        norm, finite = gradient_norm_and_finite(grads)
    assert bool(finite) and float(norm) > 0


def test_chunked_index_gather_equals_boolean_masking(tokenizer) -> None:
    model = load_causal_lm(tiny_spec(seed=5), tokenizer)
    batch = PairCollator(pad_token_id=tokenizer.pad_token_id)(rows())
    full = logprobs.model_logprobs(model, batch, with_tokens=True)
    grads_full = torch.autograd.grad(full.sums.sum(), list(model.parameters()))
    chunked = logprobs.chunked_model_logprobs(model, batch, chunk_size=7, with_tokens=True)
    grads = torch.autograd.grad(chunked.sums.sum(), list(model.parameters()))
    torch.testing.assert_close(chunked.sums, full.sums, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked.tokens, full.tokens, rtol=0, atol=1e-5)
    for a, b in zip(grads, grads_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_backward_runs_under_the_device_choice(tokenizer, monkeypatch) -> None:
    entered: list[tuple] = []

    class Recording:
        def __init__(self, backends):
            entered.append(tuple(backends))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(attention, "sdpa_kernel", Recording)
    module = PreferenceModule(model=tiny_spec())
    batch = PairCollator(pad_token_id=tokenizer.pad_token_id)(rows())
    loss = module.logprob_selector(module.policy, batch).sums.sum()
    module.backward(loss)  # on CPU: PyTorch's own choice, nothing entered
    assert entered == [] and module.policy.get_output_embeddings().weight.grad is not None
    monkeypatch.setattr(attention, "sdpa_backends", lambda device_type: attention.CUDA_SDPA_BACKENDS)  # as on CUDA
    module.backward(module.logprob_selector(module.policy, batch).sums.sum())
    assert entered == [attention.CUDA_SDPA_BACKENDS, attention.CUDA_SDPA_BACKENDS]  # the pass, then backward


def test_fused_optimizer_keeps_bf16_mixed_gradient_clipping(monkeypatch) -> None:
    """Lightning's MixedPrecision refuses to clip for an optimizer that unscales itself; without
    a scaler (bf16-mixed) the rebuilt fused optimizer must still be clipped."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    monkeypatch.setattr(optim, "fused_kernel_allowed", lambda *a, **k: True)
    param = torch.nn.Parameter(torch.ones(4))
    fused = with_fused_kernel(torch.optim.AdamW([param], lr=1e-3))
    assert fused.defaults["fused"] is True
    param.grad = torch.full((4,), 3.0)
    MixedPrecision("bf16-mixed", "cuda").clip_gradients(fused, clip_val=1.0)
    torch.testing.assert_close(torch.linalg.vector_norm(param.grad), torch.tensor(1.0), rtol=1e-5, atol=0)


def test_training_with_the_cuda_choices_forced_on_cpu_runs_and_clips(tokenizer, tmp_path, monkeypatch) -> None:
    """The CUDA configuration as the GPU benchmark runs it (fused AdamW, SDPA without cuDNN,
    sync-free metrics, bf16-mixed, gradient clipping), forced on CPU: two steps train, the
    optimizer is the fused one and the metrics hold the steps' values."""
    from dpo_lightning.data import PreferenceDataModule
    from dpo_lightning.metrics import SyncFreeMean
    from conftest import quickstart_rows

    monkeypatch.setattr(optim, "fused_kernel_allowed", lambda *a, **k: True)
    monkeypatch.setattr(attention, "sdpa_backends", lambda device_type: attention.CUDA_SDPA_BACKENDS)
    monkeypatch.setattr(SyncFreeMean, "sync_free", staticmethod(lambda device_type: True))
    module = PreferenceModule(model=tiny_spec(), optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    data = PreferenceDataModule(train_data=quickstart_rows(8), batch_size=4, max_length=64)
    data.connect(module.tokenizer, module.data_requirements)
    before = module.policy.get_output_embeddings().weight.detach().clone()
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=2, gradient_clip_val=1.0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert trainer.global_step == 2 and trainer.optimizers[0].defaults["fused"] is True
    assert not torch.equal(module.policy.get_output_embeddings().weight, before)
    assert float(trainer.callback_metrics["train_epoch/loss"]) == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=0.05)

"""KTO: the loss against its float64 formula, one-class batches, the collator and data module."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TOKENIZER_DIR, quickstart_rows, write_jsonl
from dpo_lightning.data import UnpairedCollator, UnpairedDataModule
from dpo_lightning.losses import KTOLoss, SequenceLogProbs


def kto_reference(h, kl_terms, labels, beta, wd, wu) -> float:
    z = max(sum(kl_terms) / len(kl_terms), 0.0)
    losses = []
    for hi, label in zip(h, labels):
        if label:
            losses.append(wd * (1 - 1 / (1 + math.exp(-beta * (hi - z)))))
        else:
            losses.append(wu * (1 - 1 / (1 + math.exp(-beta * (z - hi)))))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("labels", [[True, False, True, False, False], [True] * 4, [False] * 3, [True, False]])
@pytest.mark.parametrize("beta,wd,wu", [(0.1, 1.0, 1.0), (0.5, 1.0, 1.33)])
def test_kto_matches_float64_formula(labels, beta, wd, wu) -> None:
    b = len(labels)
    g = torch.Generator().manual_seed(b)
    policy = SequenceLogProbs(-20 * torch.rand(2 * b, generator=g, dtype=torch.float64), torch.ones(2 * b))
    reference = SequenceLogProbs(-20 * torch.rand(2 * b, generator=g, dtype=torch.float64), torch.ones(2 * b))
    h = (policy.sums[:b] - reference.sums[:b]).tolist()
    kl = (policy.sums[b:] - reference.sums[b:]).tolist()
    out = KTOLoss(beta, wd, wu)(policy, reference, {"label": torch.tensor(labels)})
    assert out.loss.item() == pytest.approx(kto_reference(h, kl, labels, beta, wd, wu), rel=1e-9)
    assert torch.isfinite(out.loss)
    assert out.chosen_rewards.numel() == sum(labels) and out.rejected_rewards.numel() == b - sum(labels)
    assert out.metrics["kl"].item() == pytest.approx(max(sum(kl) / b, 0.0), rel=1e-6)


def test_kto_reference_point_is_detached_and_gradient_signs() -> None:
    sums = torch.tensor([-3.0, -4.0, -5.0, -6.0], dtype=torch.float64, requires_grad=True)
    reference = SequenceLogProbs(torch.tensor([-3.5, -3.5, -2.0, -9.0], dtype=torch.float64), torch.ones(4))
    out = KTOLoss(0.1)(SequenceLogProbs(sums, torch.ones(4)), reference, {"label": torch.tensor([True, False])})
    (grad,) = torch.autograd.grad(out.loss, sums)
    assert grad[0] < 0 and grad[1] > 0  # raise desirable, lower undesirable
    assert grad[2] == 0 and grad[3] == 0  # the KL pairs carry no gradient


def test_collator_builds_mismatched_pairs_and_rejects_batch_of_one() -> None:
    rows = [
        {"prompt_ids": [1, 5, 4], "completion_ids": [6, 2], "label": True, "row_id": 0},
        {"prompt_ids": [1, 7], "completion_ids": [9, 10, 2], "label": False, "row_id": 1},
    ]
    batch = UnpairedCollator(pad_token_id=0, max_length=5)(rows)
    # mismatched rows: prompt 0 + completion 1 (cut to max_length), prompt 1 + completion 0
    assert batch["input_ids"].tolist() == [[1, 5, 4, 6, 2], [1, 7, 9, 10, 2], [1, 5, 4, 9, 10], [1, 7, 6, 2, 0]]
    assert batch["completion_mask"][2].tolist() == [0, 0, 0, 1, 1]
    assert batch["label"].tolist() == [True, False]
    with pytest.raises(ValueError, match="batch_size"):
        UnpairedCollator(0, 8)(rows[:1])


def test_paired_source_is_unpaired_automatically(tmp_path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", quickstart_rows(5))
    dm = UnpairedDataModule(train_data=path, tokenizer=TOKENIZER_DIR, batch_size=4)
    dm.setup("fit")
    assert len(dm.train_dataset) == 10 and dm.train_dataset["label"] == [True, False] * 5
    loader = dm.train_dataloader()
    assert not loader.drop_last  # 10 % 4 == 2
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 8 and batch["label"].shape == (4,)


def test_unpaired_bad_rows_and_batch_size(tmp_path) -> None:
    rows = [{"prompt": "p", "completion": " good", "label": True}, {"prompt": "p", "completion": " bad", "label": "no"},
            {"prompt": "p", "completion": "", "label": False}, {"prompt": "p", "completion": " ok", "label": None}]
    dm = UnpairedDataModule(train_data=write_jsonl(tmp_path / "u.jsonl", rows), tokenizer=TOKENIZER_DIR, batch_size=2)
    with pytest.raises(ValueError, match="only desirable"):
        dm.setup("fit")  # one usable row left, and a single class
    assert dict(dm.reports["train"].dropped) == {"wrong_type": 1, "empty_completion": 1, "missing_field": 1}
    assert dm.reports["train"].examples == {"wrong_type": [1], "empty_completion": [2], "missing_field": [3]}
    with pytest.raises(ValueError, match="batch_size"):
        UnpairedDataModule(train_data="x.jsonl", batch_size=1)


def _kl_worker(rank: int, world: int, port: int, out) -> None:
    import torch.distributed as dist

    from dpo_lightning.losses.kto import estimate_kl

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    # rank 0 holds log-ratios [1, 2, 3], rank 1 holds [-1]: the global mean is 5 / 4
    values = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) if rank == 0 else torch.tensor([-1.0], dtype=torch.float64)
    out[rank] = float(estimate_kl(values, torch.zeros_like(values)))
    dist.destroy_process_group()


def test_kl_reference_point_is_averaged_across_ranks() -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_kl_worker, args=(2, port, out), nprocs=2, join=True)
    assert out[0] == out[1] == pytest.approx(5 / 4)

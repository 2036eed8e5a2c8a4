"""Each DDP process's loss weighed by its share of the global batch (``global_batch_loss``), with
both ranks simulated in one process (float64): the mean of the two ranks' gradients (what DDP's
all-reduce computes) equals the gradient of the loss on the union of their rows, for pair means,
unpaired row means, token means, their mixture and a rank without rows. The unweighted mean of
the ranks' means is checked to differ, so the tests can fail."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from conftest import tiny_spec
from dpo_lightning.data.collator import PairCollator
from dpo_lightning.data.sft import CompletionCollator
from dpo_lightning.losses import (
    BCOLoss, ChosenNLLLoss, CPOLoss, DPOLoss, LossOutput, MixtureLoss, PreferenceLoss, SequenceLogProbs, global_batch_loss,
    mean_rows,
)
from dpo_lightning.modules import PreferenceModule, SFTModule

WORLD = 2


def pair_logps(theta: torch.Tensor, seed: int, pairs: int) -> tuple[SequenceLogProbs, SequenceLogProbs, dict]:
    """``pairs`` pairs whose policy sums depend linearly on ``theta`` ``(3,)``: features fixed by
    ``seed``; counts (completion tokens) between 1 and 9; a reference without gradient."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(2 * pairs, 3, generator=g, dtype=torch.float64)
    counts = torch.randint(1, 10, (2 * pairs,), generator=g)
    policy = SequenceLogProbs(features @ theta - counts.double(), counts)
    reference = SequenceLogProbs(-counts.double() + 0.3 * torch.randn(2 * pairs, generator=g, dtype=torch.float64), counts)
    return policy, reference, {"label": torch.arange(2 * pairs) % 3 == 0}


def concat_pairs(a: SequenceLogProbs, b: SequenceLogProbs) -> SequenceLogProbs:
    """The union of two ranks' paired log-probs: chosen halves, then rejected halves."""
    return SequenceLogProbs(torch.cat([a.chosen, b.chosen, a.rejected, b.rejected]),
                            torch.cat([a.counts[: a.counts.numel() // 2], b.counts[: b.counts.numel() // 2],
                                       a.counts[a.counts.numel() // 2 :], b.counts[b.counts.numel() // 2 :]]))


def concat_rows(a: SequenceLogProbs, b: SequenceLogProbs) -> SequenceLogProbs:
    return SequenceLogProbs(torch.cat([a.sums, b.sums]), torch.cat([a.counts, b.counts]))


def rank_losses(loss: PreferenceLoss, theta: torch.Tensor, sizes: tuple[int, int], unpaired: bool,
                weighted: bool = True) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Both ranks' losses (weighted by ``global_batch_loss`` unless ``weighted`` is False) and the
    loss of one process on the union of their rows."""
    parts = []
    for rank, size in enumerate(sizes):
        policy, reference, batch = pair_logps(theta, 10 + rank, size)
        if unpaired:  # one row per labelled completion
            policy, reference = SequenceLogProbs(policy.sums[:size], policy.counts[:size]), SequenceLogProbs(
                reference.sums[:size], reference.counts[:size])
            batch = {"label": batch["label"][:size]}
        parts.append((policy, reference, batch))
    outs = [loss(p, r, b) for p, r, b in parts]
    counts = [torch.stack([mean_rows(o, not unpaired).double(),
                           torch.zeros((), dtype=torch.float64) if o.tokens is None else o.tokens.double()])
              for o in outs]
    total = counts[0] + counts[1]

    def all_reduce(values: torch.Tensor) -> torch.Tensor:  # the sum over both simulated ranks
        return total.clone()

    if weighted:
        losses = [global_batch_loss(o.loss, mean_rows(o, not unpaired), all_reduce, WORLD, o.token_part, o.tokens)
                  for o in outs]
    else:
        losses = [o.loss for o in outs]
    join = concat_rows if unpaired else concat_pairs
    (p0, r0, b0), (p1, r1, b1) = parts
    union_batch = {"label": torch.cat([b0["label"], b1["label"]])} if unpaired else {}
    union = loss(join(p0, p1), join(r0, r1), union_batch)
    return losses, union.loss


def ddp_gradient(losses: list[torch.Tensor], theta: torch.Tensor) -> torch.Tensor:
    """DDP's gradient: the mean over ranks of each rank's gradient."""
    grads = [torch.autograd.grad(loss, theta, retain_graph=True)[0] for loss in losses]
    return sum(grads) / len(grads)


LOSSES: dict[str, tuple[Callable[[], PreferenceLoss], bool]] = {
    "dpo (pair mean)": (lambda: DPOLoss(beta=0.5), False),
    "bco (unpaired row mean)": (lambda: BCOLoss(beta=0.5).eval(), True),  # eval: the running shift is read, stays 0
    "chosen nll (token mean)": (lambda: ChosenNLLLoss(average="tokens"), False),
    "dpo + chosen nll (rows and tokens)": (
        lambda: MixtureLoss([DPOLoss(beta=0.5), ChosenNLLLoss(average="tokens")], weights=[1.0, 0.7]), False),
    "cpo (pair mean and token nll)": (lambda: CPOLoss(beta=0.5, alpha=0.8), False),
}


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("sizes", [(3, 1), (1, 4), (2, 2)])
def test_two_ranks_weighted_equal_the_global_batch(name: str, sizes: tuple[int, int]) -> None:
    make, unpaired = LOSSES[name]
    theta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    losses, union = rank_losses(make(), theta, sizes, unpaired)
    (expected,) = torch.autograd.grad(union, theta, retain_graph=True)
    torch.testing.assert_close(ddp_gradient(losses, theta), expected, rtol=1e-12, atol=1e-14)
    # the logged loss of the global batch is the mean of the weighted losses
    assert float(sum(losses).detach() / WORLD) == pytest.approx(float(union.detach()), rel=1e-12)
    plain, _ = rank_losses(make(), theta, sizes, unpaired, weighted=False)
    unweighted = ddp_gradient(plain, theta)
    if sizes[0] == sizes[1] and "token" not in name:
        torch.testing.assert_close(unweighted, expected, rtol=1e-12, atol=1e-14)  # equal rows: the plain mean is right
    else:
        assert (unweighted - expected).abs().max() > 1e-4  # unequal rows or tokens: the plain mean is not


def test_a_rank_without_rows_gets_zero_weight() -> None:
    theta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    policy, reference, _ = pair_logps(theta, 3, 2)
    out = DPOLoss(beta=0.5)(policy, reference, {})
    total = torch.tensor([2.0, 0.0], dtype=torch.float64)  # this rank's 2 pairs, the other rank's none
    mine = global_batch_loss(out.loss, mean_rows(out, True), lambda v: total.clone(), WORLD)
    empty = global_batch_loss(theta.sum() * 0.0, torch.zeros(()), lambda v: total.clone(), WORLD)
    (grad,) = torch.autograd.grad(out.loss, theta, retain_graph=True)
    # DDP's average over the two ranks is this rank's gradient: the global batch is its 2 pairs
    torch.testing.assert_close(ddp_gradient([mine, empty], theta), grad, rtol=1e-12, atol=1e-14)
    assert float(empty.detach()) == 0.0


def test_one_process_returns_the_loss_itself() -> None:
    loss = torch.tensor(0.7, dtype=torch.float64)

    def never(values: torch.Tensor) -> torch.Tensor:
        raise AssertionError("no collective in one process")

    assert global_batch_loss(loss, torch.tensor(3.0), never, 1) is loss


def test_modules_count_their_training_batches(tokenizer) -> None:
    """The preference module counts pairs and the mixture's tokens, the SFT module its tokens,
    in training mode only (validation is never weighted)."""
    rows = [
        {"prompt_ids": [1, 10, 11], "chosen_ids": [20, 21, 2], "rejected_ids": [30, 2], "row_id": 0},
        {"prompt_ids": [1, 13], "chosen_ids": [22, 23, 24, 25, 2], "rejected_ids": [31, 2], "row_id": 1},
        {"prompt_ids": [1, 14, 15], "chosen_ids": [26, 2], "rejected_ids": [34, 35, 2], "row_id": 2},
    ]
    loss = MixtureLoss([DPOLoss(beta=0.1), ChosenNLLLoss(average="tokens")])
    module = PreferenceModule(model=tiny_spec(), loss=loss, share_prompt=False)
    batch = PairCollator(tokenizer.pad_token_id)(rows)
    module.eval()
    module.step(batch, module.val_metrics)
    assert module._batch_counts is None
    module.train()
    out, _ = module.step(batch, module.train_metrics)
    rows_count, token_part, tokens = module._batch_counts
    assert float(rows_count) == 3.0 and float(tokens) == 3 + 5 + 2  # chosen completion tokens, EOS included
    assert token_part is not None and float(token_part) < float(out)  # the NLL part of the DPO + NLL total
    assert module.global_batch_share(out) is out and module._batch_counts is None  # one process: unchanged

    sft = SFTModule(model=tiny_spec())
    sft_rows = [{"prompt_ids": r["prompt_ids"], "completion_ids": r["chosen_ids"], "row_id": r["row_id"]} for r in rows]
    sft.train()
    sft_loss, _ = sft.step(CompletionCollator(tokenizer.pad_token_id)(sft_rows), sft.train_metrics)
    rows_count, token_part, tokens = sft._batch_counts
    assert float(rows_count) == 0.0 and token_part is sft_loss and float(tokens) == 10

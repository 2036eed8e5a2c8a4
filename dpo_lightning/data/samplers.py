"""Length-grouped sampling: batches of similar length, seeded, split across DDP ranks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DistributedSampler


#: what a length-grouped sampler's lengths measure: the usual two rows per pair, and one
#: ``[prompt; chosen; rejected]`` row per pair (``share_prompt``)
PROMPT_PLUS_LONGEST = "prompt + longest completion"
PROMPT_PLUS_BOTH = "prompt + both completions"


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can skip the batches an interrupted epoch already trained on.

    After :meth:`skip_batches` the next iteration starts ``n * batch_size`` indices in (this
    rank's indices); later epochs are whole again. The order is a function of
    ``(seed, epoch)`` only, so a resumed run sees exactly the rows the lost run would have.
    """

    def __init__(self, dataset_size: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(range(dataset_size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size = batch_size
        self.skip = 0

    def skip_batches(self, n: int) -> None:
        self.skip = n

    def indices(self) -> list[int]:
        return list(super().__iter__())

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip * self.batch_size, 0
        yield from self.indices()[skip:]


class LengthGroupedSampler(ResumableSampler):
    """Yield this rank's indices so that each run of ``batch_size`` indices is one batch of
    sequences of similar length (HF Trainer's ``group_by_length`` scheme, made DDP-exact).

    Every epoch: shuffle all rows with ``seed + epoch``; cut the permutation into mega-batches
    of ``mega_batch_mult * batch_size * world_size`` rows; sort each by length (longest first);
    cut into global batches of ``batch_size * world_size``; shuffle the global batches; rank
    ``r`` takes slice ``r`` of each. Every rank gets the same number of batches and distinct
    rows; the last global batch is filled up with rows from the start of the permutation
    (at most ``batch_size * world_size - 1`` repeats an epoch, as ``DistributedSampler`` does).

    It is a ``DistributedSampler`` so Lightning neither replaces it nor wraps it, and calls
    ``set_epoch`` on it every epoch. Use with ``DataLoader(batch_size=batch_size, sampler=...)``.
    Resumable mid-epoch like :class:`ResumableSampler`.

    Args:
        lengths: ``(N,)`` length of each row (e.g. prompt + longest completion tokens).
        batch_size: rows per batch on each rank.
        num_replicas / rank: the DDP world size and this process's rank.
        seed: shuffle seed; the order is a function of ``(seed, epoch)`` only.
        mega_batch_mult: how many batches are sorted together (more: less padding, less randomness).
        width: what ``lengths`` measure, in words (kept in checkpoints with the order: a resumed
            run whose rows are measured otherwise would get another order).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        mega_batch_mult: int = 50,
        width: str = PROMPT_PLUS_LONGEST,
    ) -> None:
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"bad sampler setup: batch_size={batch_size}, rank={rank}, world={num_replicas}")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.mega_batch_mult = mega_batch_mult
        self.width = width
        global_batch = batch_size * num_replicas
        self.num_global_batches = -(-len(self.lengths) // global_batch)
        self.num_samples = self.num_global_batches * batch_size
        self.total_size = self.num_samples * num_replicas
        self.shuffle = True
        self.drop_last = False
        self.skip = 0

    def global_batches(self) -> list[list[int]]:
        """All ranks' batches for the current epoch, ``batch_size * world_size`` rows each."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g)
        if self.total_size > len(order):  # fill the last global batch, cycling if the data is tiny
            order = order.repeat(-(-self.total_size // len(order)))[: self.total_size]
        global_batch = self.batch_size * self.num_replicas
        mega = global_batch * self.mega_batch_mult
        batches: list[list[int]] = []
        for start in range(0, len(order), mega):
            chunk = order[start : start + mega]
            chunk = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            batches += [chunk[i : i + global_batch].tolist() for i in range(0, len(chunk), global_batch)]
        # the longest batch first (an early out-of-memory), the rest in seeded random order
        rest = torch.randperm(len(batches) - 1, generator=g) + 1 if len(batches) > 1 else torch.tensor([], dtype=torch.long)
        longest = max(range(len(batches)), key=lambda i: int(self.lengths[batches[i]].max()))
        order_of_batches = [longest] + [int(i) if int(i) != longest else 0 for i in rest]
        return [batches[i] for i in order_of_batches]

    def indices(self) -> list[int]:
        start, end = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return [i for batch in self.global_batches() for i in batch[start:end]]

    def __len__(self) -> int:
        return self.num_samples


def padding_fraction(batches: list[list[int]], lengths: Sequence[int]) -> float:
    """Share of padded positions when each batch is padded to its longest row."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - real / padded if padded else 0.0

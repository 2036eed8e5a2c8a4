"""``ResumableDataLoader``: the training loader, stateful in Lightning's protocol.

Lightning saves ``train_dataloader().state_dict()`` in every checkpoint and, on resume, calls
``load_state_dict`` before the first batch. The state is the epoch, the number of batches the
training loop has consumed in it, and the settings that define the order (batch size, seed,
world size, row count, grouping). The order of an epoch is a function of ``(seed, epoch)``
only (see :mod:`.samplers`), so skipping the consumed batches resumes exactly where the
interrupted run was; a checkpoint taken with other order-defining settings is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from .samplers import PROMPT_PLUS_LONGEST, LengthGroupedSampler, ResumableSampler

#: state keys that define the order of batches, and the recipe key that sets each
ORDER_KEYS = {
    "batch_size": "data.init_args.batch_size",
    "seed": "data.init_args.shuffle_seed",
    "world_size": "trainer.devices / trainer.num_nodes",
    "rows": "data.init_args.train_data (and its tokenization settings)",
    "group_by_length": "data.init_args.group_by_length",
    "grouped_width": "model.init_args.share_prompt (pairs whose prompt runs once are grouped by prompt + both completions)",
}


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` with ``state_dict`` / ``load_state_dict``.

    ``state_dict()`` is read while the training loop holds batch ``k`` (0-based) of the epoch,
    after its step: the loader has handed out ``k + 1`` batches, all trained on. (Lightning
    fetches a batch ahead only from loaders without a length; this one has one.)
    """

    sampler: ResumableSampler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError("ResumableDataLoader needs a ResumableSampler")
        self.handed_out = 0  # batches of the current epoch's iterator, counting skipped ones
        self.resume: tuple[int, int] | None = None  # (epoch, batches to skip)

    def order_settings(self) -> dict[str, Any]:
        return {
            "batch_size": self.sampler.batch_size,
            "seed": self.sampler.seed,
            "world_size": self.sampler.num_replicas,
            "rows": len(self.dataset),
            "group_by_length": isinstance(self.sampler, LengthGroupedSampler),
            "grouped_width": self.sampler.width if isinstance(self.sampler, LengthGroupedSampler) else None,
        }

    def __iter__(self) -> Iterator[Any]:
        skip = self.resume[1] if self.resume is not None and self.resume[0] == self.sampler.epoch else 0
        self.sampler.skip_batches(skip)
        if skip:
            rank_zero_info(f"resuming epoch {self.sampler.epoch} after its first {skip} batches")
        self.handed_out = skip
        for batch in super().__iter__():
            self.handed_out += 1
            yield batch
        self.resume = None  # the interrupted epoch is complete

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.sampler.epoch, "batches_consumed": self.handed_out, **self.order_settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the saved epoch after its consumed batches; refuse another batch order."""
        current = self.order_settings()
        if state.get("group_by_length") and "grouped_width" not in state:
            state = {**state, "grouped_width": PROMPT_PLUS_LONGEST}  # saved before widths were told apart
        changed = [k for k in ORDER_KEYS if k in state and state[k] != current[k]]
        if changed:
            details = "; ".join(f"{ORDER_KEYS[k]}: checkpoint {state[k]!r}, now {current[k]!r}" for k in changed)
            raise ValueError(
                f"--ckpt_path: the checkpoint's batch order differs from this run's ({details}). Resume with "
                "the settings it was trained with, or start a new run without --ckpt_path"
            )
        self.resume = (int(state["epoch"]), int(state["batches_consumed"]))

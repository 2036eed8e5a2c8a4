"""What the multi-process tests load by ``class_path`` or run as a script: several fits in one
launch, a per-rank report of what each process ends with, a kill on one rank, KTO's KL rows
chosen as a 2-process run chooses them, and Lightning's FSDP strategy on CPU processes.

Run as a script, ``python ranks.py a.yaml b.yaml ... [-- fit args]`` fits each recipe in turn through
:func:`dpo_lightning.cli.run` (the code path of ``dpo-lightning fit --config``). Under DDP
Lightning starts the other ranks on the first fit by running this same command; they then run
the same fits in the same order, and the process group stays up between fits, so one launch
serves several recipes.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy

from dpo_lightning.data import UnpairedDataModule
from dpo_lightning.data.unpaired import UnpairedCollator


def tensors_digest(tensors: list[torch.Tensor]) -> str:
    """sha256 of the bytes of ``tensors`` in order: equal on two ranks only if every bit is."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class RankReport(L.Callback):
    """At the end of fit, write ``<folder>/rank<global rank>.json``: a digest of the trained
    model's weights, and where the module has them, the BCO reward shift (``mean``, ``count``),
    the precomputed reference's ``batches_computed``, and the moving reference's step counter
    and weight digest."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        report: dict[str, object] = {
            "world_size": trainer.world_size,
            "policy": tensors_digest(list(pl_module.trained_model().parameters())),
        }
        shift = getattr(getattr(pl_module, "loss", None), "shift", None)
        if shift is not None:
            report["shift_mean"], report["shift_count"] = float(shift.mean), float(shift.count)
        reference = getattr(pl_module, "reference", None)
        if hasattr(reference, "batches_computed"):
            report["batches_computed"] = reference.batches_computed
        if hasattr(reference, "steps") and hasattr(reference, "network"):
            report["reference_steps"] = int(reference.steps)
            report["reference"] = tensors_digest(list(reference.network.parameters()))
        if isinstance(trainer.strategy, FSDPStrategy):
            from torch.distributed.fsdp import FullyShardedDataParallel

            units = [m for m in trainer.strategy.model.modules() if isinstance(m, FullyShardedDataParallel)]
            report["fsdp_units"] = len(units)
        path = Path(self.folder) / f"rank{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report))


class KillRankAtStep(L.Callback):
    """SIGKILL the process of global rank ``rank`` after optimizer step ``step`` (no cleanup,
    like an out-of-memory killer taking one worker of a DDP job)."""

    def __init__(self, step: int, rank: int = 1) -> None:
        self.step = step
        self.rank = rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)


class BlockwiseKLCollator(UnpairedCollator):
    """KTO's collator with each KL partner chosen within the row's block of ``block`` rows:
    a batch of ``2 * block`` rows in one process then gets the KL rows that two processes, each
    holding one block of it, build."""

    def __init__(self, pad_token_id: int, max_length: int, block: int) -> None:
        super().__init__(pad_token_id, max_length, with_kl=True)
        self.block = block

    def partner(self, prompts: list[list[int]], i: int) -> int:  # type: ignore[override]
        start = i - i % self.block
        return start + UnpairedCollator.partner(prompts[start : start + self.block], i - start)


class BlockwiseKLDataModule(UnpairedDataModule):
    """:class:`UnpairedDataModule` whose training batches pair KL rows within blocks of
    ``kl_block`` rows (:class:`BlockwiseKLCollator`); validation batches are unchanged."""

    def __init__(self, *args, kl_block: int = 2, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kl_block = kl_block

    def train_dataloader(self):
        loader = super().train_dataloader()
        assert self.tokenizer is not None
        loader.collate_fn = BlockwiseKLCollator(self.tokenizer.pad_token_id, self.settings.max_length, self.kl_block)
        return loader


def fit_many(paths: list[str], args: list[str]) -> None:
    """``dpo-lightning fit --config path *args`` for each of ``paths``, in this process."""
    from dpo_lightning.cli import run

    for path in paths:
        run(["fit", "--config", path, *args])


if __name__ == "__main__":
    # ranks.py a.yaml b.yaml [-- --ckpt_path last]
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    fit_many(argv[:split], argv[split + 1 :])


def full_state_dict_in_place(module: torch.nn.Module, world_size: int, rank0_only: bool = True):
    """Lightning's full-state-dict context without ``offload_to_cpu``: torch's FSDP (2.13) ends
    in a segmentation fault when it offloads parameters that are already on the CPU."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.api import FullOptimStateDictConfig

    return FSDP.state_dict_type(
        module=module, state_dict_type=StateDictType.FULL_STATE_DICT,
        state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` on CPU processes (gloo), to run the sharded code paths
    (sharded frozen reference, full-logits log-probs, the gathered export) without a GPU.

    Three refusals stand in the way of the plain strategy on CPU, all about devices, not about
    sharding (README, distributed section): Lightning's accelerator check (``type(strategy) is
    FSDPStrategy`` needs a GPU; a subclass passes); torch's FSDP without a ``device_id`` looks
    for an accelerator (this passes ``device_id=cpu``); and the full state dict offloads to the
    CPU, which crashes for CPU parameters (this gathers in place, :func:`full_state_dict_in_place`)."""

    def setup_environment(self) -> None:
        import lightning.fabric.strategies.fsdp as fabric_fsdp
        import lightning.pytorch.strategies.fsdp as pytorch_fsdp

        fabric_fsdp._get_full_state_dict_context = full_state_dict_in_place
        pytorch_fsdp._get_full_state_dict_context = full_state_dict_in_place
        super().setup_environment()

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        original = FullyShardedDataParallel.__init__

        def on_cpu(fsdp, *args, device_id=None, **kwargs):
            original(fsdp, *args, device_id=torch.device("cpu") if device_id is None else device_id, **kwargs)

        FullyShardedDataParallel.__init__ = on_cpu
        try:
            return super()._setup_model(model)
        finally:
            FullyShardedDataParallel.__init__ = original

"""What the multi-process online and iterative tests (``tests/test_ddp_online.py``) load by
``class_path`` or by a judge's ``module:function``: judges with ties, and callbacks that write
down what each process sampled, judged and trained on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def coarse_length(completion: str) -> float:
    """A judge with ties: the completion's length in characters, in buckets of 8."""
    return float(len(completion) // 8)


def tied_on_rank_one(completion: str) -> float:
    """Every sample of process 1 scores 0 (all its pairs tie); elsewhere the length in characters."""
    return 0.0 if rank() == 1 else float(len(completion))


def distinct(completion: str) -> float:
    """A judge without ties between different texts: the length, broken by the characters."""
    return float(len(completion)) + 1e-6 * sum(ord(c) * (i + 1) for i, c in enumerate(completion)) % 1.0


class RecordOnline(L.Callback):
    """Writes ``<folder>/online_rank<r>.json``: for every training batch of an
    :class:`~dpo_lightning.modules.OnlinePreferenceModule`, the sampling seed and what was
    sampled, judged and paired on this process; and at each validation's end this process's own
    (not yet synced) sum and weight of each ``val_online`` mean."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.batches: list[dict[str, Any]] = []
        self.validations: list[dict[str, list[float]]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        log_judged = pl_module.log_judged

        def recording(judged) -> None:
            samples = judged.samples
            self.batches[-1].update(
                prompt_ids=samples.prompt_ids, prompts=samples.prompts, row_ids=samples.row_ids,
                completion_ids=samples.completion_ids, has_eos=samples.has_eos,
                scores=judged.scores.double().tolist(), pairs=[list(p) for p in judged.pairs], ties=judged.ties,
            )
            log_judged(judged)

        pl_module.log_judged = recording

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append({"step": int(trainer.global_step), "batch_idx": batch_idx,
                             "seed": pl_module.seed_for(0, batch_idx)})

    def on_validation_epoch_end(self, trainer, pl_module) -> None:  # before the module's own: local states
        self.validations.append({name: [float(m.mean_value), float(m.weight)] for name, m in pl_module.val_online.items()})

    def on_fit_end(self, trainer, pl_module) -> None:
        path = Path(self.folder) / f"online_rank{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"world_size": trainer.world_size, "batches": self.batches,
                                    "validations": self.validations}))


class RecordRounds(L.Callback):
    """Writes ``<folder>/rounds_rank<r>.json``: at the start of every training epoch (round) of
    an :class:`~dpo_lightning.iterative.IterativePairsDataModule`, a digest of the round's pairs
    this process holds, and the pair row ids of each training batch it trains on."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.rounds: list[dict[str, Any]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        rows = trainer.datamodule.round_rows
        digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
        self.rounds.append({"round": trainer.datamodule.round_index, "pairs": len(rows), "digest": digest, "batches": []})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rounds[-1]["batches"].append(batch["row_id"].tolist())

    def on_fit_end(self, trainer, pl_module) -> None:
        path = Path(self.folder) / f"rounds_rank{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"world_size": trainer.world_size, "rounds": self.rounds}))

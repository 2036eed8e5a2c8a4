"""Iterative DPO: rounds of (sample from the current policy -> judge -> best-vs-worst pairs ->
train one epoch on them), in one ``dpo-lightning fit`` run.

Xiong et al. 2024 ("RLHF Workflow", arXiv 2405.07863) and OpenRLHF's iterative DPO run each
round as its own job; here a round is an epoch. :class:`IterativePairsDataModule` reads a
prompt set and, when Lightning asks for the training loader of epoch ``r``
(``trainer.reload_dataloaders_every_n_epochs: 1``), samples ``sampling.num_samples`` completions
per prompt from the module's *current* policy, judges them and forms pairs (the pipeline of
:mod:`dpo_lightning.generation`) and serves them as ``PAIRS`` batches
(:class:`~dpo_lightning.data.PairCollator`) carrying the judge's scores as ``score_chosen`` /
``score_rejected``. Any pairwise loss trains on them through the unchanged
:class:`~dpo_lightning.modules.PreferenceModule` step (DPO, IPO, ODPO on the judge's scores,
SimPO, ...); :class:`~dpo_lightning.modules.iterative.IterativePreferenceModule` adds the
reference reset at round boundaries. Recipe: ``recipes/iterative_dpo.yaml``.

Why a data module: the pairs of a round are a dataset (fixed for the round, shuffled, batched,
resumable), which is what a data module serves; the module's training step stays the offline
one. The data module reaches the policy through ``trainer.lightning_module.trained_model()``
(any module that trains a causal LM) and the tokenizer it was given by ``connect``.

Sampling. :func:`~dpo_lightning.generation.sample_completions` (the prefill-once loop of
:mod:`dpo_lightning.decoding`, or ``generate`` with ``sampling.engine: generate``, with the KV
cache under ``no_grad`` and eval mode, modes restored after, in a random stream of its own: the
run's random stream is untouched), the settings below, each completion cut at its first EOS and kept as
sampled when it has none (``missing_eos_penalty`` lowers its score instead). Prompts are cut
into generation batches of ``generation_batch_size`` (by length when ``group_by_length``, else
in row order); batch ``g`` of round ``r`` is sampled with seed
``generation_seed(base, 2, r, g)`` (``base``: ``sampling.seed``, default the Lightning seed),
so the pairs of a round are a function of the policy at the round's start, the seed and the
prompts only: not of the world size, the rank or a resume. Under DDP each process samples the
batches ``g = rank, rank + world, ...`` and all processes gather every pair.

Steps per round are fixed: ``S = ceil(prompts * m / (batch_size * world))`` batches on each
process (``m`` the most pairs a prompt can give: 1 for ``best_vs_worst``, ``k (k - 1) / 2`` for
``all``), so the learning-rate schedule (``trainer.estimated_stepping_batches`` = rounds x S)
is known before the first round and is the same on resume. The round's ``P`` pairs are
shuffled (seed: ``shuffle_seed`` and the round) and dealt into ``S`` global batches as evenly
as possible (sizes differ by at most one), each then split over the ``world`` processes (again
differing by at most one; none above ``batch_size``): the global batches are those of one
process with ``batch_size * world`` pairs a batch, whatever the world size, and each process's
loss is weighed by its share of the global batch's pairs
(:meth:`~dpo_lightning.modules.base.AlignmentModule.global_batch_share`), so 2 processes take
the steps of one on the same global batch. Ties make batches smaller, not fewer. When ``P < S *
world`` (almost every prompt tied) pairs are repeated to give every process's batch one, with a
warning; a round without any pair is an error.

Resuming. The round's pairs (token ids and scores) are part of the data module's state in
every checkpoint. A run resumed *at a round boundary* (a checkpoint of the end of an epoch)
samples the next round from the restored policy with the round's seed: what the
uninterrupted run sampled. A run resumed *in the middle of a round* does not sample again
(the policy has moved since the round started): it takes the round's pairs from the
checkpoint and skips the batches already trained on, so it too continues as the
uninterrupted run would.

Validation (``val_data`` / ``val_fraction``: prompts). Held-out pairs sampled and judged the
same way, once, from the policy before the first round (at the sanity check or before round
1; seed ``generation_seed(base, 3, 0, g)``), and kept for the whole run (and in checkpoints):
the module's validation then reports reward accuracy and margins on one fixed set of judged
pairs, comparable across rounds. For the judge's score of the policy's own samples per round,
see ``round/score_mean`` below and :class:`~dpo_lightning.callbacks.LogCompletions`.

Logged to the trainer's loggers when a round's pairs are sampled (step: the global step):
``round/index`` (1-based), ``round/score_mean`` (mean judge score of all samples: the policy
at the round's start), ``round/score_chosen`` / ``round/score_rejected`` (over the pairs),
``round/pairs``, ``round/tied`` (prompts, or sample pairs for ``all``, skipped because the
scores were equal), ``round/prompts``, ``round/completion_length`` (tokens, EOS included),
``round/eos_fraction``. The pairs of round ``n`` are also written as a preference dataset to
``<log_dir>/rounds/round_<n>.jsonl`` (``prompt``, ``chosen``, ``rejected``, ``score_chosen``,
``score_rejected``; ``data.init_args.train_data`` of an offline run can read it).

Under DDP (tested with 2 CPU processes against one process with the same
``generation_batch_size`` and global batch): every process holds every pair of the round (the
same round file, the same digest), trains on its part of each global batch, and the run ends
with one process's weights within float tolerance. Not yet run under FSDP or DeepSpeed ZeRO-3 (where
``generate`` needs the full weights).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .contract import BatchLayout, DataRequirements
from .data.collator import PairCollator
from .data.prompts import PromptCollator, PromptDataModule
from .data.sources import DataSpec
from .generation import (
    SCORE_COLUMNS, JudgedPairs, SamplingSpec, check_judge, check_pair_columns, check_positions, generating_model,
    generation_seed, judge_and_pair, pair_rows, refuse_flat_sampling, sample_completions, stop_token_ids,
    text_pair_rows, write_jsonl,
)
from .judges import Judge, PairwiseJudge

DATA_KEY = "data.init_args"
#: ``stage`` parts of the seeds (see the module docstring)
TRAIN_STAGE, VAL_STAGE, SHUFFLE_STAGE = 2, 3, 4


# -- pieces ------------------------------------------------------------------------------------------
@dataclass
class RoundStats:
    """What one round's sampling produced (summed over all processes)."""

    round: int = 0  # 1-based
    prompts: int = 0
    samples: int = 0
    score_sum: float = 0.0
    length_sum: float = 0.0
    eos: int = 0
    pairs: int = 0
    tied: int = 0
    chosen_sum: float = 0.0
    rejected_sum: float = 0.0

    @classmethod
    def of(cls, judged: JudgedPairs) -> RoundStats:
        """The counts and sums of one generation batch."""
        samples, flat = judged.samples, judged.scores.double().tolist()
        chosen, rejected = judged.pair_scores()
        return cls(
            prompts=len(samples.prompts), samples=len(flat), score_sum=sum(flat),
            length_sum=float(sum(map(len, samples.completion_ids))), eos=sum(samples.has_eos), pairs=len(judged.pairs),
            tied=judged.ties, chosen_sum=sum(chosen), rejected_sum=sum(rejected),
        )

    def add(self, other: RoundStats) -> None:
        for name in ("prompts", "samples", "score_sum", "length_sum", "eos", "pairs", "tied", "chosen_sum", "rejected_sum"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def metrics(self, prefix: str = "round/") -> dict[str, float]:
        """The logged values (see the module docstring)."""
        out = {
            "index": float(self.round),
            "score_mean": self.score_sum / max(self.samples, 1),
            "pairs": float(self.pairs),
            "tied": float(self.tied),
            "prompts": float(self.prompts),
            "completion_length": self.length_sum / max(self.samples, 1),
            "eos_fraction": self.eos / max(self.samples, 1),
        }
        if self.pairs:
            out["score_chosen"] = self.chosen_sum / self.pairs
            out["score_rejected"] = self.rejected_sum / self.pairs
        return {prefix + k: v for k, v in out.items()}


def plan_batches(n_pairs: int, n_batches: int, seed: int, world_size: int = 1) -> list[list[int]]:
    """``n_batches * world_size`` lists of pair indices: a seeded permutation of
    ``range(n_pairs)`` dealt into ``n_batches`` global batches in contiguous runs whose sizes
    differ by at most one, each global batch then split into ``world_size`` contiguous parts
    (again differing by at most one): ``out[j * world_size + r]`` is process ``r``'s part of
    global batch ``j``. The global batches are those of one process (``world_size=1``) for the
    same ``n_batches``, whatever the world size. With fewer pairs than ``n_batches *
    world_size`` the permutation is repeated so that every process's batch holds one pair."""
    if n_pairs < 1 or n_batches < 1 or world_size < 1:
        raise ValueError(
            f"plan_batches needs pairs, batches and processes, got {n_pairs} pairs for {n_batches} batches "
            f"on {world_size} processes"
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_pairs, generator=generator).tolist()
    if n_pairs < n_batches * world_size:
        order = [order[i % n_pairs] for i in range(n_batches * world_size)]
    return [part for batch in deal(order, n_batches) for part in deal(batch, world_size)]


def deal(items: list[int], n: int) -> list[list[int]]:
    """``items`` cut into ``n`` contiguous runs whose sizes differ by at most one (longer first)."""
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


class RoundPairs(Dataset):
    """A round's pair rows; indexed by a list of indices (one batch at a time)."""

    def __init__(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int | list[int]) -> Any:
        if isinstance(index, list):
            return [self.rows[i] for i in index]
        return self.rows[index]


class RoundSampler(DistributedSampler):
    """Yields this process's batches of a round (each a list of row indices): global batch ``j``
    is ``batches[j * world : (j + 1) * world]``, of which process ``rank`` takes its own. A
    ``DistributedSampler``, so Lightning neither replaces nor wraps it."""

    def __init__(self, batches: list[list[int]], num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(len(batches)), num_replicas=num_replicas, rank=rank, shuffle=False)
        if len(batches) % num_replicas:
            raise ValueError(f"{len(batches)} batches cannot be shared by {num_replicas} processes")
        self.batches = batches[rank::num_replicas]
        self.num_samples = len(self.batches)
        self.total_size = len(batches)
        self.skip = 0

    def skip_batches(self, n: int) -> None:
        self.skip = n

    def __iter__(self) -> Iterator[list[int]]:  # type: ignore[override]
        skip, self.skip = self.skip, 0
        yield from self.batches[skip:]

    def __len__(self) -> int:
        return len(self.batches)


class RoundLoader(DataLoader):
    """The training loader of one round, stateful in Lightning's protocol: its state is the
    round and the batches handed out; a state saved in another round is ignored (this round
    starts from its beginning), one of the same round resumes after its consumed batches."""

    sampler: RoundSampler

    def __init__(self, rows: RoundPairs, sampler: RoundSampler, collate_fn: Any, round_index: int, num_workers: int = 0) -> None:
        super().__init__(rows, batch_size=None, sampler=sampler, collate_fn=collate_fn, num_workers=num_workers)
        self.round_index = round_index
        self.handed_out = 0
        self.resume_after = 0

    def __iter__(self) -> Iterator[Any]:
        skip, self.resume_after = self.resume_after, 0
        self.sampler.skip_batches(skip)
        if skip:
            rank_zero_info(f"resuming round {self.round_index + 1} after its first {skip} batches")
        self.handed_out = skip
        for batch in super().__iter__():
            self.handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round_index, "batches_consumed": self.handed_out, "batches": len(self.sampler),
                "pairs": len(self.dataset), "world_size": self.sampler.num_replicas}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("round") != self.round_index:
            return
        current = self.state_dict()
        changed = [k for k in ("batches", "pairs", "world_size") if k in state and state[k] != current[k]]
        if changed:
            details = ", ".join(f"{k}: checkpoint {state[k]!r}, now {current[k]!r}" for k in changed)
            raise ValueError(
                f"--ckpt_path: round {self.round_index + 1}'s batches differ from the checkpoint's ({details}); resume "
                "with the data.init_args (batch_size, num_samples, pairs) and trainer.devices it was trained with"
            )
        self.resume_after = int(state["batches_consumed"])


def gather(obj: Any, world_size: int) -> list[Any]:
    """``obj`` of every process (``torch.distributed.all_gather_object``); ``[obj]`` alone."""
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("IterativePairsDataModule: several processes but no torch.distributed process group")
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


@dataclass
class SampledSplit:
    """A split's pairs and what sampling them gave."""

    rows: list[dict[str, Any]]
    stats: RoundStats
    texts: list[dict[str, Any]] = field(default_factory=list)  # the rows as text, for the round file


# -- the data module -----------------------------------------------------------------------------
class IterativePairsDataModule(PromptDataModule):
    """Prompts in, ``PAIRS`` batches out: each epoch's pairs are sampled from the policy at the
    epoch's start and judged (see the module docstring for sampling, seeding, steps per round,
    resuming, validation and what is logged).

    Use with ``trainer.max_epochs`` = rounds and ``trainer.reload_dataloaders_every_n_epochs: 1``
    (required when there is more than one epoch) and a module that trains a causal LM on pairs
    (:class:`~dpo_lightning.modules.iterative.IterativePreferenceModule`, or
    ``PreferenceModule`` for a reference that never moves).

    Args:
        train_data / val_data / ...: the prompt rows (a ``prompt`` column: strings, or
            conversations rendered with the chat template's generation prompt), as
            :class:`~dpo_lightning.data.PromptDataModule` reads them.
        judge: a :class:`~dpo_lightning.judges.Judge` or :class:`~dpo_lightning.judges.PairwiseJudge`
            (with a pairwise judge, each sample's score is its mean win probability against the
            prompt's other samples).
        sampling: :class:`~dpo_lightning.generation.SamplingSpec`; default ``num_samples: 4``
            (RLHF Workflow samples 8), the rest the spec's defaults.
        generation_batch_size: prompts per ``generate`` call (each gives ``num_samples``
            sequences); default ``batch_size``. Part of the seeding: keep it to reproduce a run.
        batch_size: at most this many pairs per training batch (see steps per round).
        eval_batch_size: validation pairs per batch; default ``batch_size``.
        group_by_length: generation batches of prompts of similar length (less left padding).
        kwargs: :class:`~dpo_lightning.data.PromptDataModule`'s other arguments, passed through.
    """

    layout = BatchLayout.PAIRS

    def __init__(
        self,
        train_data: DataSpec,
        judge: Judge | PairwiseJudge,
        sampling: SamplingSpec | None = None,
        generation_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        refuse_flat_sampling(kwargs, DATA_KEY)
        check_judge(judge, f"{DATA_KEY}.judge")
        self.sampling = (sampling or SamplingSpec(num_samples=4)).validate(f"{DATA_KEY}.sampling")
        if generation_batch_size is not None and generation_batch_size < 1:
            raise ValueError(f"{DATA_KEY}.generation_batch_size must be >= 1 (or null for batch_size), got {generation_batch_size}")
        super().__init__(train_data=train_data, **kwargs)
        self.judge = judge
        self.generation_batch_size = generation_batch_size or self.batch_size
        self.round_index: int | None = None  # 0-based round whose pairs are held
        self.round_rows: list[dict[str, Any]] | None = None
        self.val_rows: list[dict[str, Any]] | None = None
        self.history: list[dict[str, float]] = []  # the logged values of each round sampled by this process

    # -- the contract -------------------------------------------------------------------------------
    def connect(self, tokenizer: Any, requirements: DataRequirements | None = None) -> None:
        """As :meth:`TokenizedDataModule.connect`; the loss may read only the judge's scores."""
        check_pair_columns(requirements.columns if requirements else (), "the loss", "IterativePairsDataModule's pairs")
        super().connect(tokenizer, requirements)

    def check_columns(self, rows: datasets.Dataset, key: str) -> None:
        """Only ``prompt`` is read: the loss's score columns come from the judge."""
        missing = [c for c in self.needed_columns(rows) if c not in rows.column_names]
        if missing:
            raise ValueError(
                f"{key}: column(s) {missing} missing; found {rows.column_names}. {self.columns_hint()}: rename the "
                f"data's columns with {DATA_KEY}.columns, e.g. {{your_name: prompt}}"
            )

    def sampling_settings(self) -> dict[str, Any]:
        """Everything besides the prompts that decides a round's pairs (part of ``data_fingerprint``)."""
        spec = self.sampling
        return {
            "judge": repr(self.judge), "num_samples": spec.num_samples, "pairs": spec.pairs,
            "max_new_tokens": spec.max_new_tokens, "temperature": spec.temperature, "top_p": spec.top_p,
            "top_k": spec.top_k, "missing_eos_penalty": spec.missing_eos_penalty, "generation_seed": spec.seed,
            "generation_batch_size": self.generation_batch_size, "group_by_length": self.group_by_length,
            "batch_size": self.batch_size, "shuffle_seed": self.shuffle_seed,
        }

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit":  # a new fit starts at round 1; a resumed one gets its state back after this
            self.round_index, self.round_rows, self.val_rows, self.history = None, None, None, []
        super().setup(stage)
        if "train" in self.splits:
            settings = json.dumps(self.sampling_settings(), sort_keys=True, default=str)
            self.data_fingerprint = f"{self.splits['train']._fingerprint} {settings}"

    # -- rounds ---------------------------------------------------------------------------------------
    def steps_per_round(self, world_size: int = 1) -> int:
        """Training batches each process gets in every round (see the module docstring)."""
        assert self.train_dataset is not None, "call setup() first"
        return max(1, math.ceil(len(self.train_dataset) * self.sampling.pairs_per_prompt() / (self.batch_size * world_size)))

    def check_trainer(self) -> None:
        trainer = self.trainer
        if trainer is None:
            raise ValueError("IterativePairsDataModule samples from the trainer's module: use it through trainer.fit")
        if trainer.reload_dataloaders_every_n_epochs != 1 and trainer.max_epochs != 1:
            raise ValueError(
                "IterativePairsDataModule samples each round's pairs when Lightning rebuilds the training loader; set "
                f"trainer.reload_dataloaders_every_n_epochs: 1 (it is {trainer.reload_dataloaders_every_n_epochs}), "
                "with trainer.max_epochs = the number of rounds"
            )

    def current_round(self) -> int:
        """The 0-based round (epoch) Lightning is building the loader for: the epochs the fit loop
        has finished processing (right whether the run is fresh, between epochs or resumed).

        Not ``trainer.current_epoch`` (the public name), which counts *completed* epochs: resumed
        from a checkpoint saved at an epoch's end (``on_train_epoch_end``, between Lightning's
        ``processed`` and ``completed`` counts), it is one behind while the first loader is built,
        and this would sample the finished round again. Lightning's own stopping check reads
        ``processed`` for the same reason. The one read of Lightning's loop state here."""
        return int(self.trainer.fit_loop.epoch_progress.current.processed)

    def sample_split(self, split: str, stage: int, round_index: int) -> SampledSplit:
        """Sample, judge and pair every prompt of ``split`` with the current policy (all
        processes take part; every process returns all pairs, in generation-batch order)."""
        trainer = self.trainer
        assert self.tokenizer is not None
        policy = generating_model(trainer.lightning_module, "IterativePairsDataModule")
        device = next(policy.parameters()).device
        self.judge.to(device)
        dataset = self.splits[split]
        lengths = [len(ids) for ids in dataset["prompt_ids"]]
        spec = self.sampling
        check_positions(max(lengths), spec.max_new_tokens, self.requirements.max_positions,
                        f"{DATA_KEY}.sampling.max_new_tokens", f"{DATA_KEY}.max_prompt_length")
        order = sorted(range(len(lengths)), key=lambda i: lengths[i]) if self.group_by_length else list(range(len(lengths)))
        groups = [order[i : i + self.generation_batch_size] for i in range(0, len(order), self.generation_batch_size)]
        world, rank = trainer.world_size, trainer.global_rank
        collate = PromptCollator(self.tokenizer.pad_token_id)
        stops = stop_token_ids(policy, self.tokenizer)
        local = []
        for g in range(rank, len(groups), world):
            batch = collate([dataset[i] for i in groups[g]])
            batch = {n: v.to(device) if isinstance(v, torch.Tensor) else v for n, v in batch.items()}
            seed = generation_seed(spec.base_seed(), stage, round_index, g)
            samples = sample_completions(
                policy, self.tokenizer, batch, spec.num_samples, seed=seed,
                max_new_tokens=spec.max_new_tokens, stop_ids=stops, **spec.distribution(), engine=spec.engine,
            )
            judged = judge_and_pair(self.judge, samples, spec, seed)
            rows = pair_rows(samples, judged.pairs, judged.scores, samples.row_ids or [])
            local.append((g, rows, text_pair_rows(judged), RoundStats.of(judged)))
        merged = sorted((item for part in gather(local, world) for item in part), key=lambda item: item[0])
        total = RoundStats(round=round_index + 1)
        out = SampledSplit([], total)
        for _, rows, texts, stats in merged:
            out.rows += rows
            out.texts += texts
            total.add(stats)
        return out

    def start_round(self, round_index: int) -> None:
        """Sample round ``round_index``'s pairs, log and write them."""
        trainer = self.trainer
        rank_zero_info(
            f"round {round_index + 1}: sampling {self.sampling.num_samples} completions for each of {len(self.train_dataset)} "
            "prompts from the current policy"
        )
        sampled = self.sample_split("train", TRAIN_STAGE, round_index)
        metrics = sampled.stats.metrics()
        if not sampled.rows:
            raise ValueError(
                f"round {round_index + 1}: no pairs: the judge gave every prompt's {self.sampling.num_samples} samples the "
                f"same score ({sampled.stats.tied} tied); raise {DATA_KEY}.sampling.num_samples or temperature, start from a policy "
                "whose samples differ, or use a judge that tells them apart"
            )
        self.round_index, self.round_rows = round_index, sampled.rows
        self.history.append(metrics)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "rounds"  # log_dir is a collective: every rank
        if trainer.is_global_zero:
            write_jsonl(folder / f"round_{round_index + 1}.jsonl", sampled.texts)
        rank_zero_info(
            f"round {round_index + 1}: mean score {metrics['round/score_mean']:.4f}, {sampled.stats.pairs} pairs, "
            f"{sampled.stats.tied} tied -> {folder / f'round_{round_index + 1}.jsonl'}"
        )

    def collator(self) -> PairCollator:  # type: ignore[override]
        assert self.tokenizer is not None
        return PairCollator(self.tokenizer.pad_token_id, columns=SCORE_COLUMNS)

    def train_dataloader(self) -> RoundLoader:
        """The current round's pairs (sampled now, unless this round's are already held)."""
        self.check_trainer()
        trainer = self.trainer
        round_index = self.current_round()
        if round_index == 0 and self.val_rows is None and "val" in self.splits and trainer.limit_val_batches != 0:
            self.val_rows = self.sample_val()  # from the policy before any training, like the sanity check's
        if self.round_rows is None or self.round_index != round_index:
            self.start_round(round_index)
        assert self.round_rows is not None
        world, rank = trainer.world_size, trainer.global_rank
        steps = self.steps_per_round(world)
        if len(self.round_rows) < steps * world:
            warnings.warn(
                f"round {round_index + 1}: {len(self.round_rows)} pairs for {steps * world} batches; pairs are repeated so "
                "that every batch holds one (most prompts' samples tied)",
                stacklevel=2,
            )
        seed = generation_seed(self.shuffle_seed, SHUFFLE_STAGE, round_index)
        batches = plan_batches(len(self.round_rows), steps, seed, world)
        return RoundLoader(
            RoundPairs(self.round_rows), RoundSampler(batches, world, rank), self.collator(), round_index, self.num_workers
        )

    # -- validation -----------------------------------------------------------------------------------
    def sample_val(self) -> list[dict[str, Any]]:
        rank_zero_info(f"sampling the validation pairs: {self.sampling.num_samples} completions for each of {len(self.splits['val'])} prompts")
        sampled = self.sample_split("val", VAL_STAGE, 0)
        rank_zero_info(
            f"validation pairs: {sampled.stats.pairs} ({sampled.stats.tied} tied), mean score "
            f"{sampled.stats.metrics()['round/score_mean']:.4f}"
        )
        return sampled.rows

    def val_dataloader(self) -> DataLoader | list:
        """The held-out pairs, sampled once (see the module docstring); ``[]`` without a val split."""
        if "val" not in self.splits:
            return []
        if self.val_rows is None:
            self.val_rows = self.sample_val()
        if not self.val_rows:
            warnings.warn("every validation prompt's samples tied: no validation pairs", stacklevel=2)
            return []
        return DataLoader(RoundPairs(self.val_rows), batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=self.collator(), num_workers=self.num_workers)

    def ordered_loader(self, split: str) -> DataLoader:
        raise ValueError(
            "IterativePairsDataModule's pairs are sampled from the policy every round, so their reference log-probs "
            "cannot be precomputed: set model.init_args.reference.precompute: false"
        )

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The round's pairs (a mid-round resume trains on them, not on new samples), the
        validation pairs and the rounds' logged values."""
        return {"round": self.round_index, "rows": self.round_rows, "val_rows": self.val_rows, "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.round_index = state_dict.get("round")
        self.round_rows = state_dict.get("rows")
        self.val_rows = state_dict.get("val_rows")
        self.history = list(state_dict.get("history") or [])


__all__ = ["IterativePairsDataModule", "RoundPairs", "RoundLoader", "RoundSampler", "RoundStats", "plan_batches"]

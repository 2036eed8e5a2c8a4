"""``OnlinePreferenceModule``: online preference optimisation (Guo et al. 2024, "Direct Language
Model Alignment from Online AI Feedback", arXiv 2402.04792).

Each training step, for a batch of ``B`` prompts (the ``PROMPTS`` layout of
:class:`~dpo_lightning.data.PromptDataModule`):

1. sample ``k = sampling.num_samples`` completions per prompt from the current policy
   (:meth:`OnlinePreferenceModule.sample`: the sampling loop of :mod:`dpo_lightning.decoding`,
   or ``generate``, with the KV cache, in eval mode, under ``no_grad``, seeded from the run's
   seed and the step);
2. cut each at its first EOS and score it with the judge; 3. form preference pairs from the
   scores; 4. lay them out as a ``PAIRS`` batch, the judge's scores as ``score_chosen`` /
   ``score_rejected``: the generation pipeline of :mod:`dpo_lightning.generation`;
5. compute the loss with :meth:`PreferenceModule.step`, the code offline training runs: any
   pairwise loss of the library (DPO, IPO, ODPO on the judge's scores, SimPO, ...), any
   reference strategy, the same log-prob paths and metrics.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import MeanMetric

from ..contract import BatchLayout, DataRequirements, PairRows
from ..data.collator import pad_sequences
from ..generation import (
    EXACT, SCORE_COLUMNS, JudgedPairs, SamplingSpec, Samples, build_pair_batch, check_judge, check_pair_columns,
    check_positions, cut_at_eos, form_pairs, generation_seed, judge_and_pair, judge_samples, pairwise_win_rates,
    position_limit, refuse_flat_sampling, sample_completions, sample_pair_batch, stop_token_ids,
)
from ..judges import Judge, PairwiseJudge
from ..losses import PreferenceLoss, SequenceLogProbs
from ..models import ModelSpec, attention_widths
from .logprobs import LogProbSelector
from .base import sum_over_ranks
from .preference import PreferenceModule
from .reference import REFERENCE_KEY, refuse_moved_settings

MODEL_KEY = "model.init_args"
#: the old name of :class:`~dpo_lightning.generation.Samples`
OnlineSamples = Samples


def take_rows(logprobs: SequenceLogProbs, index: Tensor) -> SequenceLogProbs:
    """The rows ``index`` ``(M,)`` of per-sequence log-probs (sums, counts and, when computed,
    square mass; per-token values are not carried): ``(S,)`` samples -> ``(M,)`` pair sides."""
    mass = logprobs.square_mass
    return SequenceLogProbs(logprobs.sums[index], logprobs.counts[index],
                            square_mass=None if mass is None else mass[index])


#: elementwise operations per attention score and head (the mask, the softmax and their gradients)
#: that :func:`padded_layout_cost` counts next to the ``4 * q_dim`` multiply-adds of a score's two
#: products. Chosen so that the estimate picks the layout measured faster at both of
#: ``benchmarks/online_throughput.py``'s settings with 8 samples a prompt (benchmarks/README.md):
#: grouped at ``small`` (1.28x), separate at ``sentiment`` (grouped 0.93x).
SCORE_OPS_PER_HEAD = 64


def padded_layout_cost(config: Any, lengths: list[int]) -> float:
    """Estimated operations a layer spends on rows of ``lengths`` tokens padded to the longest:
    each padded position's projections and MLP (``2 * (h * (q + 2 kv) + q * h + 3 * h * i)``)
    plus every score of its ``L x L`` attention (``4 * q + SCORE_OPS_PER_HEAD * heads``), for a
    config's ``hidden_size`` h, ``intermediate_size`` i, query / key-value widths q / kv."""
    if not lengths:
        return 0.0
    hidden = config.hidden_size
    heads, kv_heads, head_dim = attention_widths(config)
    query, kv = heads * head_dim, kv_heads * head_dim
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    per_token = 2 * (hidden * (query + 2 * kv) + query * hidden + 3 * hidden * intermediate)
    per_score = 4 * query + SCORE_OPS_PER_HEAD * heads
    rows, width = len(lengths), max(lengths)
    return float(rows * width * per_token + rows * width * width * per_score)


class OnlinePreferenceModule(PreferenceModule):
    """Online preference optimisation: the policy's own samples, judged, are the pairs
    (OAIF, arXiv 2402.04792; TRL's ``OnlineDPOTrainer``).

    Trains on ``PROMPTS`` batches (:class:`~dpo_lightning.data.PromptDataModule`). Every step:
    sample ``sampling.num_samples`` completions per prompt from the current policy, score them
    with ``judge``, form pairs (``sampling.pairs``), and compute ``loss`` on them through
    :meth:`PreferenceModule.step` (see the module docstring). Everything else (reference
    strategies, LoRA, log-prob paths, export, checkpoints, non-finite guard) is
    :class:`PreferenceModule`'s.

    Sampling. :func:`~dpo_lightning.generation.sample_completions` (``sampling.engine``: the
    prefill-once loop of :mod:`dpo_lightning.decoding`, or ``generate``) with the KV cache, the
    ``temperature`` / ``top_p`` / ``top_k`` below (repetition penalty, typical-p and min-p are
    off, whatever the checkpoint's ``generation_config`` says), under ``no_grad`` with the policy in eval mode
    (no dropout), its mode restored after. Each completion ends at its first EOS (the
    tokenizer's, or any of the ``generation_config``'s). A completion that reaches
    ``max_new_tokens`` without one is kept as sampled, without an EOS appended: its log-prob is
    that of the tokens the policy produced (appending one would train on a token it never
    sampled and teach it to stop at the cut); ``missing_eos_penalty`` lowers its score instead,
    as TRL does. Generation is seeded from ``sampling.seed`` (default: the Lightning seed,
    ``seed_everything``), the stage, the global step, the batch index and the rank, in a random
    stream of its own: the same seed gives the same samples, a resumed run samples what the
    uninterrupted one did, and the rest of the run's random stream is untouched.

    Pairs. ``"best_vs_worst"`` (default): per prompt, the best against the worst sample.
    ``"all"``: every two samples with different scores. Pairs with equal scores are skipped and
    counted in ``online/tied_pairs``. A pairwise judge compares every two samples of a prompt;
    each sample's score is its mean win probability against the others (with two samples, ``p``
    and ``1 - p``). A batch without any pair adds no gradient (its loss is a zero that touches
    every trained parameter, so DDP still synchronises); when no process had a pair in any
    batch of an optimizer step, the step is skipped and counted (``online/skipped_steps``, logged
    every step); a run in which every step was skipped fails at its end instead of exporting
    the untrained policy. A judge that raises or gives a non-finite score stops the run with one
    line naming the judge, the prompt and the value.

    Losses. Any pairwise loss (``batch_layout`` ``PAIRS``); the judge's scores are the batch's
    ``score_chosen`` / ``score_rejected`` (ODPO's offset reads them). Unpaired losses (KTO)
    are refused, and so is a loss that reads other columns.

    Logged every training step (``train/``): the loss's values as in offline training, and
    ``online/score_mean`` (mean judge score of all samples), ``online/score_chosen``,
    ``online/score_rejected`` (means over the pairs), ``online/completion_length`` (tokens,
    EOS included), ``online/eos_fraction``, ``online/tied_pairs`` (count in the batch),
    ``online/pairs`` (count). Validation (``PROMPTS`` val split): one sample per prompt with
    exact ancestral sampling (temperature 1, no top-k / top-p, whatever the training settings),
    logged as ``val/score`` (mean judge score; pointwise judges only), ``val/kl`` (with a
    reference: the Monte-Carlo estimate of ``KL(pi || pi_ref)``, the mean over samples of
    ``log pi(y|x) - log pi_ref(y|x)``, as ``dpo-lightning-evaluate``),
    ``val/completion_length`` and ``val/eos_fraction``.

    Args:
        model: the policy (hub id / folder, or a config).
        judge: a :class:`~dpo_lightning.judges.Judge` or :class:`~dpo_lightning.judges.PairwiseJudge`.
        loss: a pairwise loss; default ``DPOLoss(beta=0.1)``.
        sampling: :class:`~dpo_lightning.generation.SamplingSpec` (``num_samples`` default 2,
            as OAIF and TRL; ``pairs``, ``max_new_tokens``, ``temperature``, ``top_p``,
            ``top_k``, ``missing_eos_penalty``, ``seed``).
        share_prompt: as :class:`PreferenceModule` (``"auto"``: each pair's prompt runs once on a
            CPU for the architectures where that is exact; 1.15x -> 1.33x TRL's online step at
            ``small`` in ``benchmarks/online_throughput.py``).
        samples_once: run each sample's sequence once in the training pass, however many pairs
            it is in, and give each pair its samples' log-probs (``sampling.pairs: all`` puts
            each of ``k`` samples in ``k - 1`` pairs: ``k`` sequences instead of ``k (k - 1)``).
            The loss is the pair layout's (tested to 1e-10 in float64) and so are its gradients
            (to float32 rounding: Llama's RMSNorm computes in float32 even in a float64 model).
            ``"auto"`` (default): per step, whichever of the two layouts runs fewer tokens
            (the pair layout counted with ``share_prompt``'s single prompt where it is on);
            ``True`` / ``False``: always / never. Not with a loss that reads per-token
            log-probs (LD-DPO), whose values depend on the pair.
        kwargs: :class:`PreferenceModule`'s other arguments (``reference``, ``optimizer``,
            ``lora``, ...), passed through; ``reference.precompute`` does not apply (the
            completions change every step).

    Under DDP (tested with 2 CPU processes): each process samples its own prompts (the
    distributed sampler splits them) with its own seed (the rank is part of it), and judges its
    own samples; process ``r``'s samples and pairs are what one process gives for those prompts
    with that seed. Each process's loss is weighed by its share of the step's pairs
    (:meth:`~.base.AlignmentModule.global_batch_share`), so the update is one process's on the
    union of every process's pairs, also when their numbers differ or one process has none (it
    runs the same collectives with weight 0). The ``train/online/*`` figures are the union's
    (sums and counts all-reduced); validation's are synced means over every process's samples.
    A loss that all-reduces inside its forward (``BCOPairLoss(reward_shift=True)``) is refused
    under DDP: a process without pairs runs no loss. Not yet run under FSDP or DeepSpeed
    ZeRO-3, where ``generate`` needs the full weights gathered.
    """

    validates_implicit_rewards = False  # validation measures the policy's samples (score, KL)

    def __init__(
        self,
        model: ModelSpec,
        judge: Judge | PairwiseJudge,
        loss: PreferenceLoss | None = None,
        sampling: SamplingSpec | None = None,
        share_prompt: bool | Literal["auto"] = "auto",
        samples_once: bool | Literal["auto"] = "auto",
        **kwargs: Any,
    ) -> None:
        refuse_flat_sampling(kwargs, MODEL_KEY)
        if samples_once not in (True, False, "auto"):
            raise ValueError(f"{MODEL_KEY}.samples_once must be true, false or auto, got {samples_once!r}")
        refuse_moved_settings(kwargs)
        sampling = self.check_settings(judge, loss, sampling or SamplingSpec())
        reference = kwargs.get("reference")
        if reference is not None and reference.precompute:
            raise ValueError(
                f"{REFERENCE_KEY}.precompute: online training samples new completions every step, so their "
                "reference log-probs cannot be precomputed; set it to false"
            )
        super().__init__(model=model, loss=loss, share_prompt=share_prompt, **kwargs)
        # again, here: the judge (a function or a model) stays out of the checkpoint's hyperparameters
        self.save_hyperparameters(ignore=["judge", "loss", "optimizer", "scheduler", "export_dir", "overwrite_export"])
        self.judge = judge
        self.sampling = sampling
        if samples_once is True and self.loss_reads_token_logprobs:
            raise ValueError(
                f"{MODEL_KEY}.samples_once: {type(self.loss).__name__} reads per-token log-probs, which are laid out "
                "per pair; set samples_once to auto or false"
            )
        self.samples_once = samples_once
        self.skipped_steps = 0
        self._pairs_since_step = False
        # validation: per-sample means, synced across processes
        self.val_online = torch.nn.ModuleDict(
            {name: MeanMetric() for name in ("score", "kl", "completion_length", "eos_fraction")}
        )
        # the KL estimate runs on single sequences: never the shared-prompt packing of pairs
        self.sequence_logprobs = LogProbSelector(
            kwargs.get("logprobs", "auto"), kwargs.get("logprob_chunk_size", "auto"), share_prompt=False
        )

    @staticmethod
    def check_settings(judge: Any, loss: PreferenceLoss | None, sampling: SamplingSpec) -> SamplingSpec:
        """Refuse unusable settings before any model is loaded, naming the recipe key."""
        check_judge(judge, f"{MODEL_KEY}.judge")
        if loss is not None:
            if not loss.pairwise:
                raise ValueError(
                    f"{MODEL_KEY}.loss: {type(loss).__name__} trains on unpaired rows ({loss.batch_layout.value}); "
                    "online training forms pairs from the policy's samples: use a pairwise loss "
                    "(DPOLoss, IPOLoss, ODPOLoss, SimPOLoss, ...)"
                )
            check_pair_columns(loss.score_columns, f"{MODEL_KEY}.loss: {type(loss).__name__}", "online batches")
        return sampling.validate(f"{MODEL_KEY}.sampling")

    @property
    def data_requirements(self) -> DataRequirements:
        """Prompts alone (the pairs are sampled here), and the policy's position limit."""
        return DataRequirements(BatchLayout.PROMPTS).with_model_limit(self.policy)

    def fingerprint(self) -> dict[str, str]:
        """:class:`PreferenceModule`'s parts and the judge's (:meth:`~dpo_lightning.judges.Judge.fingerprint`):
        another judge would train the rest of a resumed run on other preferences."""
        return {**super().fingerprint(), **self.judge.fingerprint()}

    def summary_metrics(self) -> dict[str, str]:
        """The judge's mean score of the policy's samples and their KL to the reference (each
        when validation measured it)."""
        return {"score": "val/score", "kl": "val/kl"}

    # -- sampling -------------------------------------------------------------------------------
    def seed_for(self, stage: int, batch_idx: int) -> int:
        """The sampling seed of one batch: the base seed, stage (0 train, 1 val), global step,
        batch index and rank."""
        attached = self.attached_trainer is not None
        rank, step = (self.global_rank, self.global_step) if attached else (0, 0)
        return generation_seed(self.sampling.base_seed(), stage, step, batch_idx, rank)

    def sample(self, batch: dict[str, Any], num_samples: int, seed: int, exact: bool = False) -> Samples:
        """``num_samples`` completions for each prompt of a ``PROMPTS`` batch from the policy
        (:func:`~dpo_lightning.generation.sample_completions` with this module's settings).

        Args:
            batch: ``input_ids`` / ``attention_mask`` ``(B, T)`` left-padded, ``prompt`` (``B`` prompts).
            num_samples: ``k``.
            seed: seeds a forked RNG (the run's own stream is left as it was); see :meth:`seed_for`.
            exact: ancestral sampling (temperature 1, no top-k / top-p) instead of the
                configured settings (validation's KL estimate needs samples from the policy).
        """
        max_new_tokens = self.sampling.max_new_tokens
        check_positions(
            int(batch["attention_mask"].sum(-1).max()), max_new_tokens, position_limit(self.policy),
            f"{MODEL_KEY}.sampling.max_new_tokens", "data.init_args.max_prompt_length",
        )
        return sample_completions(
            self.policy, self.tokenizer, batch, num_samples, seed=seed, max_new_tokens=max_new_tokens,
            stop_ids=stop_token_ids(self.policy, self.tokenizer), **(EXACT if exact else self.sampling.distribution()),
            engine=self.sampling.engine,
        )

    def judge_samples(self, samples: Samples) -> Tensor:
        """``(B * k,)`` float32 scores of the samples (after ``missing_eos_penalty``)."""
        return judge_samples(self.judge, samples, self.sampling.missing_eos_penalty)

    # -- training --------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        seed = self.seed_for(0, batch_idx)
        samples = self.sample(batch, self.sampling.num_samples, seed)
        judged = judge_and_pair(self.judge, samples, self.sampling, seed)
        self.log_judged(judged)
        if not judged.pairs:
            self.note_rows(batch["row_id"])
            params = [p for p in self.trained_model().parameters() if p.requires_grad]
            zero = sum((p.sum() * 0.0 for p in params), torch.zeros((), device=self.device))
            # no rows: weight 0 in the global batch, and the same collective as a process with pairs
            self.count_batch(torch.zeros((), device=self.device))
            return self.global_batch_share(zero)
        self._pairs_since_step = True
        pad = self.tokenizer.pad_token_id
        grouped = self.samples_once is not False and self.groups_samples(samples, judged.pairs)
        layout = sample_pair_batch if self.runs_samples_once(samples, judged.pairs, grouped) else build_pair_batch
        pair_batch = layout(samples, judged.pairs, judged.scores, batch["row_id"].tolist(), pad)
        if "prompt_group" in pair_batch and not grouped:
            del pair_batch["prompt_group"]  # each sample in its own row, with its own copy of the prompt
        pair_batch = {name: value.to(self.device) for name, value in pair_batch.items()}
        return super().training_step(pair_batch, batch_idx)

    def runs_samples_once(
        self, samples: Samples, pairs: list[tuple[int, int, int]], grouped: bool | None = None
    ) -> bool:
        """Whether this step's pairs train in the samples layout (:func:`sample_pair_batch`, each
        sample's sequence once) rather than as pairs (``samples_once``; ``"auto"``: the layout
        of fewer tokens, never for a loss that reads per-token log-probs). ``grouped``: what
        :meth:`groups_samples` says for these pairs, when the caller already asked it."""
        if self.samples_once != "auto":
            return bool(self.samples_once)
        if self.loss_reads_token_logprobs:
            return False
        k = samples.num_samples
        prompt = [len(p) for p in samples.prompt_ids]
        completion = [len(c) for c in samples.completion_ids]
        shared = self.pairs_share_prompts()
        as_pairs = sum((1 if shared else 2) * prompt[i] + completion[i * k + c] + completion[i * k + r]
                       for i, c, r in pairs)
        used = {i * k + j for i, c, r in pairs for j in (c, r)}
        if self.groups_samples(samples, pairs) if grouped is None else grouped:  # a prompt once for all its samples
            prompt_tokens = sum(prompt[i] for i in {flat // k for flat in used})
        else:
            prompt_tokens = sum(prompt[flat // k] for flat in used)
        return prompt_tokens + sum(completion[flat] for flat in used) < as_pairs

    def pairs_share_prompts(self) -> bool:
        """Whether pair batches run each pair's prompt once on this device (``share_prompt``)."""
        rows = self.logprob_selector.pair_rows(self.policy)  # the layout pair batches take
        return rows is PairRows.SHARED or (rows is PairRows.SHARED_ON_CPU and self.device.type == "cpu")

    def groups_samples(self, samples: Samples, pairs: list[tuple[int, int, int]]) -> bool:
        """Whether the samples layout puts each prompt's samples in one row behind one copy of
        the prompt (``prompt_group``): where pairs share their prompt, and the estimate
        :func:`padded_layout_cost` of that layout's longer rows (its attention grows with the
        square of a row) is below the separate rows'."""
        if not self.pairs_share_prompts():
            return False
        k = samples.num_samples
        prompt = [len(p) for p in samples.prompt_ids]
        completion = [len(c) for c in samples.completion_ids]
        used = sorted({i * k + j for i, c, r in pairs for j in (c, r)})
        grouped: dict[int, int] = {}
        for flat in used:
            grouped[flat // k] = grouped.get(flat // k, prompt[flat // k]) + completion[flat]
        config = self.policy.config
        separate = [prompt[flat // k] + completion[flat] for flat in used]
        return padded_layout_cost(config, list(grouped.values())) < padded_layout_cost(config, separate)

    def pair_logprobs(self, batch: dict[str, Tensor]) -> tuple[SequenceLogProbs, SequenceLogProbs | None]:
        """A pair batch's log-probs as :class:`PreferenceModule` computes them; for the samples
        layout (``pair_sample`` in ``batch``), each distinct sample's once (policy and
        reference; where pairs share their prompt, a prompt once for all its samples,
        ``prompt_group``), then each pair's chosen and rejected taken from them (``(2P,)``)."""
        if "pair_sample" not in batch:
            return super().pair_logprobs(batch)
        # grouped rows (prompt_group): the pairs' selector, which packs a group behind one prompt;
        # otherwise single sequences, never the pair packing
        selector = self.logprob_selector if "prompt_group" in batch else self.sequence_logprobs
        compute = partial(self.logprobs, selector=selector)
        index = batch["pair_sample"]
        policy = compute(self.policy, batch)
        reference = self.reference.logprobs(self.policy, batch, compute)
        return take_rows(policy, index), None if reference is None else take_rows(reference, index)

    @property
    def loss_reads_token_logprobs(self) -> bool:
        """The loss reads per-token log-probs (LD-DPO), laid out per pair: never the samples layout."""
        return self.loss.needs_token_logprobs or self.loss.needs_reference_tokens

    def log_judged(self, judged: JudgedPairs) -> None:
        """``train/online/*`` of one batch (see the class docstring): under DDP of the global
        batch, every process's samples and pairs (sums and counts all-reduced, one collective
        that every process runs, then the same values logged by each)."""
        samples = judged.samples
        chosen, rejected = judged.pair_scores()
        totals = sum_over_ranks(torch.tensor([
            float(judged.scores.double().sum()), float(len(samples.texts)), float(sum(map(len, samples.completion_ids))),
            float(sum(samples.has_eos)), float(judged.ties), float(len(judged.pairs)), sum(chosen), sum(rejected),
            float(len(samples.prompts)),
        ], dtype=torch.float64, device=self.device)).tolist()
        score_sum, n_samples, length_sum, eos, ties, pairs, chosen_sum, rejected_sum, prompts = totals
        online = {
            "score_mean": score_sum / n_samples,
            "completion_length": length_sum / n_samples,
            "eos_fraction": eos / n_samples,
            "tied_pairs": ties,
            "pairs": pairs,
        }
        if pairs:
            online["score_chosen"] = chosen_sum / pairs
            online["score_rejected"] = rejected_sum / pairs
        for name, value in online.items():
            self.log(f"train/online/{name}", torch.tensor(value, dtype=torch.float32, device=self.device),
                     batch_size=int(prompts))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        had_pairs, self._pairs_since_step = self._pairs_since_step, False
        skip = self.trainer.strategy.reduce_boolean_decision(not had_pairs, all=True)
        if skip:  # no process trained on a pair (else every process steps: DDP keeps them equal)
            for param in self.trained_model().parameters():
                param.grad = None  # optimizers skip parameters without a gradient: no update at all
            self.skipped_steps += 1
            rank_zero_info(f"step {self.global_step}: no sample pair with different scores in any batch; step skipped")
        self.log("train/online/skipped_steps", float(self.skipped_steps), rank_zero_only=True)

    def on_fit_end(self) -> None:
        """Refuse to export a policy that no step trained (every step skipped for ties)."""
        steps = int(self.global_step)
        if steps and self.skipped_steps >= steps:
            raise RuntimeError(
                f"every optimizer step ({steps} of {steps}) was skipped: the judge gave all samples of every prompt "
                f"the same score, so there was no pair to train on and the policy is unchanged (not exported). Use a "
                f"judge that tells the samples apart, raise {MODEL_KEY}.sampling.num_samples or temperature, or start "
                "from a policy whose samples differ"
            )
        super().on_fit_end()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["online_skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.skipped_steps = int(checkpoint.get("online_skipped_steps", 0))

    # -- validation ------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        samples = self.sample(batch, 1, self.seed_for(1, batch_idx), exact=True)
        metrics = self.val_online
        metrics["completion_length"].update(torch.tensor([len(c) for c in samples.completion_ids], dtype=torch.float32))
        metrics["eos_fraction"].update(torch.tensor(samples.has_eos, dtype=torch.float32))
        if isinstance(self.judge, Judge):
            metrics["score"].update(judge_samples(self.judge, samples))
        if self.loss.needs_reference:
            sequences = pad_sequences(samples.prompt_ids, samples.completion_ids, self.tokenizer.pad_token_id)
            sequences = {name: value.to(self.device) for name, value in sequences.items()}
            trainer = self.attached_trainer
            strategy = trainer.strategy if trainer is not None else None

            def compute(model: torch.nn.Module, rows: dict[str, Tensor]):
                return self.sequence_logprobs(model, rows, strategy)

            policy = compute(self.policy, sequences).sums.double()
            reference = self.reference.logprobs(self.policy, sequences, compute)
            if reference is not None:
                metrics["kl"].update((policy - reference.sums.double()).float())

    def on_validation_epoch_start(self) -> None:
        self.judge.to(self.device)

    def on_validation_epoch_end(self) -> None:
        values = {}
        for name, metric in self.val_online.items():
            if metric.update_called:
                values[name] = float(metric.compute())
            with torch.inference_mode(False):  # fresh states usable by fit's no_grad validation after trainer.validate
                metric.reset()
        self.log_dict({f"val/{name}": value for name, value in values.items()})
        self.validation_history.append(
            {"step": self.global_step, "sanity_check": bool(self.trainer.sanity_checking), **values}
        )

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.judge.to(self.device)
        if self.trainer.world_size > 1 and self.loss.communicates():
            raise ValueError(
                f"{MODEL_KEY}.loss: {type(self.loss).__name__} all-reduces inside its forward (BCOPairLoss's "
                "reward_shift), and under DDP a process whose samples all tied runs no loss in that step, so the "
                "processes' collectives would not match; set reward_shift: false, or train on one process"
            )


__all__ = [
    "OnlinePreferenceModule", "OnlineSamples", "build_pair_batch", "cut_at_eos", "form_pairs", "pairwise_win_rates",
    "sample_completions", "SCORE_COLUMNS",
]

"""``OnlinePreferenceModule``: online preference optimisation (Guo et al. 2024, "Direct Language
Model Alignment from Online AI Feedback", arXiv 2402.04792).

Each training step, for a batch of ``B`` prompts (the ``PROMPTS`` layout of
:class:`~dpo_lightning.data.PromptDataModule`):

1. sample ``k = num_samples`` completions per prompt from the current policy
   (:meth:`OnlinePreferenceModule.sample`: ``generate`` with the KV cache, in eval mode, under
   ``no_grad``, seeded from the run's seed and the step);
2. cut each at its first EOS and score it with the judge (:mod:`dpo_lightning.judges`);
3. form preference pairs from the scores (:func:`form_pairs`);
4. lay the pairs out as a ``PAIRS`` batch with :class:`~dpo_lightning.data.PairCollator`
   (:func:`build_pair_batch`), the judge's scores as ``score_chosen`` / ``score_rejected``;
5. compute the loss with :meth:`PreferenceModule.step`, the code offline training runs: any
   pairwise loss of the library (DPO, IPO, ODPO on the judge's scores, SimPO, ...), any
   reference strategy, the same log-prob paths and metrics.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import MeanMetric

from ..contract import BatchLayout, DataRequirements
from ..data.collator import PairCollator, pad_sequences
from ..judges import Judge, PairwiseJudge, Prompt
from ..lora import LoraSpec
from ..losses import PreferenceLoss
from ..models import ModelSpec
from .logprobs import LogProbSelector
from .preference import PreferenceModule
from .reference import ReferenceUpdate

PairMode = Literal["best_vs_worst", "all"]
#: the batch columns the module fills from the judge's scores
SCORE_COLUMNS = ("score_chosen", "score_rejected")
MODEL_KEY = "model.init_args"


# -- pieces, each testable on its own ---------------------------------------------------------
@dataclass
class OnlineSamples:
    """``k`` completions for each of ``B`` prompts, sample ``j`` of prompt ``i`` at index ``i * k + j``.

    Attributes:
        prompt_ids: ``B`` lists: each prompt's tokens (left padding removed).
        completion_ids: ``B * k`` lists: the sampled tokens up to and including the first EOS;
            a sample that reached ``max_new_tokens`` first keeps all of them, with no EOS.
        has_eos: ``B * k``: whether the sample stopped by itself.
        texts: ``B * k`` completion texts (decoded without special tokens), what the judge reads.
        prompts: ``B`` prompts as the data gives them (strings or conversations).
        num_samples: ``k``.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    has_eos: list[bool]
    texts: list[str]
    prompts: list[Prompt]
    num_samples: int

    def prompts_per_sample(self) -> list[Prompt]:
        """``B * k`` prompts, one for each sample."""
        return [p for p in self.prompts for _ in range(self.num_samples)]


def cut_at_eos(rows: Sequence[Sequence[int]], eos_ids: Sequence[int]) -> tuple[list[list[int]], list[bool]]:
    """Each generated row up to and including its first EOS (any of ``eos_ids``), and whether it
    had one. A row without an EOS (generation stopped at ``max_new_tokens``) is kept whole: what
    the policy sampled, no EOS appended."""
    stops = set(int(e) for e in eos_ids)
    out, has_eos = [], []
    for row in rows:
        row = [int(t) for t in row]
        end = next((i for i, t in enumerate(row) if t in stops), None)
        out.append(row if end is None else row[: end + 1])
        has_eos.append(end is not None)
    return out, has_eos


def form_pairs(scores: Tensor, mode: PairMode = "best_vs_worst") -> tuple[list[tuple[int, int, int]], int]:
    """Preference pairs from the scores of ``k`` samples of each prompt.

    Args:
        scores: ``(B, k)`` judge scores (higher is better).
        mode: ``"best_vs_worst"``: per prompt, its highest-scored sample (the first of equal
            ones) against its lowest (the first of equal ones): at most one pair per prompt.
            ``"all"``: every two samples of a prompt whose scores differ, the higher one as
            chosen: up to ``k (k - 1) / 2`` pairs per prompt.
    Returns:
        ``(pairs, ties)``: ``pairs`` as ``(prompt index, chosen sample j, rejected sample j)``
        in prompt order (then by sample index); ``ties``: candidate pairs skipped because their
        scores are equal (``best_vs_worst``: prompts whose samples all scored the same; ``all``:
        tied pairs of samples).
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"form_pairs needs (B, k >= 2) scores, got shape {tuple(scores.shape)}")
    values = scores.detach().double().cpu().tolist()
    pairs: list[tuple[int, int, int]] = []
    ties = 0
    for i, row in enumerate(values):
        if mode == "best_vs_worst":
            best = max(range(len(row)), key=lambda j: (row[j], -j))
            worst = min(range(len(row)), key=lambda j: (row[j], j))
            if row[best] > row[worst]:
                pairs.append((i, best, worst))
            else:
                ties += 1
        elif mode == "all":
            for a in range(len(row)):
                for b in range(a + 1, len(row)):
                    if row[a] > row[b]:
                        pairs.append((i, a, b))
                    elif row[b] > row[a]:
                        pairs.append((i, b, a))
                    else:
                        ties += 1
        else:
            raise ValueError(f"{MODEL_KEY}.pairs must be best_vs_worst or all, got {mode!r}")
    return pairs, ties


def build_pair_batch(
    samples: OnlineSamples,
    pairs: Sequence[tuple[int, int, int]],
    scores: Tensor,
    row_ids: Sequence[int],
    pad_token_id: int,
) -> dict[str, Tensor]:
    """The ``PAIRS`` batch of ``pairs``, built by :class:`~dpo_lightning.data.PairCollator`
    (so it is exactly what the offline data path gives for the same token ids):
    ``input_ids``, ``attention_mask``, ``completion_mask`` ``(2P, T)``, ``row_id`` ``(P,)`` (the
    prompt's source row), ``score_chosen`` / ``score_rejected`` ``(P,)`` float32.

    Args:
        samples: the sampled completions.
        pairs: ``(prompt index, chosen j, rejected j)`` from :func:`form_pairs`.
        scores: ``(B * k,)`` judge scores of the samples.
        row_ids: ``B`` source rows of the prompts.
        pad_token_id: the tokenizer's pad id.
    """
    k = samples.num_samples
    flat = scores.detach().double().cpu().tolist()
    rows = [
        {
            "prompt_ids": samples.prompt_ids[i],
            "chosen_ids": samples.completion_ids[i * k + c],
            "rejected_ids": samples.completion_ids[i * k + r],
            "row_id": int(row_ids[i]),
            "score_chosen": flat[i * k + c],
            "score_rejected": flat[i * k + r],
        }
        for i, c, r in pairs
    ]
    return PairCollator(pad_token_id, columns=SCORE_COLUMNS)(rows)


def pairwise_win_rates(judge: PairwiseJudge, samples: OnlineSamples) -> Tensor:
    """``(B * k,)``: each sample's mean probability, by ``judge``, of beating the other samples
    of its prompt (every unordered pair judged once, in one call). With ``k = 2``: ``p`` and
    ``1 - p`` for the judge's ``p``."""
    k = samples.num_samples
    index = [(i * k + a, i * k + b) for i in range(len(samples.prompts)) for a in range(k) for b in range(a + 1, k)]
    prompts = [samples.prompts[first // k] for first, _ in index]
    p = judge.prefer(prompts, [samples.texts[a] for a, _ in index], [samples.texts[b] for _, b in index]).double().cpu()
    wins = torch.zeros(len(samples.texts), dtype=torch.float64)
    for (a, b), value in zip(index, p.tolist()):
        wins[a] += value
        wins[b] += 1.0 - value
    return (wins / (k - 1)).float()


@torch.no_grad()
def sample_completions(
    policy: torch.nn.Module,
    tokenizer: Any,
    batch: dict[str, Any],
    num_samples: int,
    *,
    seed: int,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
) -> OnlineSamples:
    """``num_samples`` completions of each prompt of a ``PROMPTS`` batch from ``policy``.

    ``generate`` with the KV cache and ``do_sample``; ``temperature`` / ``top_p`` / ``top_k`` as
    given (defaults: exact ancestral sampling) and the other distribution-changing processors a
    checkpoint's ``generation_config`` may turn on (repetition penalty, typical-p, min-p,
    no-repeat n-grams) switched off. Runs under ``no_grad`` with every submodule of ``policy``
    in eval mode (no dropout), each put back in its own mode after, inside a forked RNG seeded
    with ``seed`` (CPU and, on CUDA, the batch's device), so the caller's random stream is
    untouched. Each completion is cut at its first token of ``stop_ids`` (:func:`cut_at_eos`).

    Args:
        policy: a causal LM (or a peft model around one).
        tokenizer: its tokenizer (pad id, decoding).
        batch: ``input_ids`` / ``attention_mask`` ``(B, T)`` left-padded, ``prompt`` (``B`` prompts).
        num_samples: ``k`` samples per prompt; sample ``j`` of prompt ``i`` is at ``i * k + j``.
        seed: the sampling seed.
        max_new_tokens: most tokens per completion.
        stop_ids: tokens that end a completion (the first is the tokenizer's EOS).
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    lengths = attention_mask.sum(-1).tolist()
    prompt_ids = [row[row.numel() - n :].tolist() for row, n in zip(input_ids, lengths)]
    device = input_ids.device
    modes = [(m, m.training) for m in policy.modules()]
    policy.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.default_generator.manual_seed(seed)
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            out = policy.generate(
                input_ids=input_ids.repeat_interleave(num_samples, 0),
                attention_mask=attention_mask.repeat_interleave(num_samples, 0),
                do_sample=True, max_new_tokens=max_new_tokens, use_cache=True, temperature=temperature,
                top_p=top_p, top_k=top_k, repetition_penalty=1.0, typical_p=1.0, min_p=0.0, no_repeat_ngram_size=0,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=list(stop_ids),
            )
    finally:
        for module, training in modes:  # each submodule as it was (a frozen part may be in eval mode)
            module.training = training
    sequences = out.sequences if hasattr(out, "sequences") else out
    completions, has_eos = cut_at_eos(sequences[:, input_ids.shape[1] :].tolist(), stop_ids)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return OnlineSamples(prompt_ids, completions, has_eos, texts, list(batch["prompt"]), num_samples)


def generation_seed(base: int, *parts: int) -> int:
    """A 32-bit seed that is a function of ``base`` and ``parts`` (stage, step, batch, rank) only."""
    return int(np.random.SeedSequence([int(base) % 2**32, *(int(p) % 2**32 for p in parts)]).generate_state(1)[0])


class OnlinePreferenceModule(PreferenceModule):
    """Online preference optimisation: the policy's own samples, judged, are the pairs
    (OAIF, arXiv 2402.04792; TRL's ``OnlineDPOTrainer``).

    Trains on ``PROMPTS`` batches (:class:`~dpo_lightning.data.PromptDataModule`). Every step:
    sample ``num_samples`` completions per prompt from the current policy, score them with
    ``judge``, form pairs (``pairs``), and compute ``loss`` on them through
    :meth:`PreferenceModule.step` (see the module docstring). Everything else (reference
    strategies, LoRA, log-prob paths, export, checkpoints, non-finite guard) is
    :class:`PreferenceModule`'s.

    Sampling. ``generate`` with the KV cache, ``do_sample``, the ``temperature`` / ``top_p`` /
    ``top_k`` below (repetition penalty, typical-p and min-p are switched off, whatever the
    checkpoint's ``generation_config`` says), under ``no_grad`` with the policy in eval mode
    (no dropout), its mode restored after. Each completion ends at its first EOS (the
    tokenizer's, or any of the ``generation_config``'s). A completion that reaches
    ``max_new_tokens`` without one is kept as sampled, without an EOS appended: its log-prob is
    that of the tokens the policy produced (appending one would train on a token it never
    sampled and teach it to stop at the cut); ``missing_eos_penalty`` lowers its score instead,
    as TRL does. Generation is seeded from ``generation_seed`` (default: the Lightning seed,
    ``seed_everything``), the stage, the global step, the batch index and the rank, inside a
    forked RNG: the same seed gives the same samples, a resumed run samples what the
    uninterrupted one did, and the rest of the run's random stream is untouched.

    Pairs. ``"best_vs_worst"`` (default): per prompt, the best against the worst sample.
    ``"all"``: every two samples with different scores. Pairs with equal scores are skipped and
    counted in ``online/tied_pairs``. A pairwise judge compares every two samples of a prompt;
    each sample's score is its mean win probability against the others (with two samples, ``p``
    and ``1 - p``). A batch without any pair adds no gradient (its loss is a zero that touches
    every trained parameter, so DDP still synchronises); when no process had a pair in any
    batch of an optimizer step, the step is skipped (``online/skipped_steps``).

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
        num_samples: completions per prompt, >= 2. Default 2 (OAIF, TRL).
        pairs: ``"best_vs_worst"`` (default) or ``"all"``.
        max_new_tokens: most tokens sampled per completion. Default 64. The longest prompt plus
            this must fit the model's ``max_position_embeddings``.
        temperature: > 0, default 1.0. top_p: in (0, 1], default 1.0. top_k: >= 0, 0 (default) is off.
        missing_eos_penalty: subtracted from the score of a completion without an EOS; ``None``
            (default) leaves scores alone.
        generation_seed: base seed of sampling; ``None`` (default) takes the Lightning seed
            (``PL_GLOBAL_SEED``, set by ``seed_everything``), else 0.
        reference_model, optimizer, scheduler, export_dir, overwrite_export, gradient_checkpointing,
        on_nonfinite, logprobs, logprob_chunk_size, lora, share_prompt, reference_update,
        disable_dropout: as :class:`PreferenceModule` (``precompute_reference`` does not apply:
            the completions change every step).

    Not yet run under FSDP or DeepSpeed ZeRO-3, where ``generate`` needs the full weights
    gathered.
    """

    def __init__(
        self,
        model: ModelSpec,
        judge: Judge | PairwiseJudge,
        loss: PreferenceLoss | None = None,
        num_samples: int = 2,
        pairs: PairMode = "best_vs_worst",
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        missing_eos_penalty: float | None = None,
        generation_seed: int | None = None,
        reference_model: ModelSpec | None = None,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        export_dir: str | None = None,
        overwrite_export: bool = False,
        gradient_checkpointing: bool = False,
        on_nonfinite: Literal["stop", "skip"] = "stop",
        logprobs: Literal["auto", "chunked", "full"] = "auto",
        logprob_chunk_size: int = 1024,
        lora: LoraSpec | None = None,
        share_prompt: bool = False,
        reference_update: ReferenceUpdate | None = None,
        disable_dropout: bool = True,
    ) -> None:
        self.check_settings(judge, loss, num_samples, pairs, max_new_tokens, temperature, top_p, top_k, missing_eos_penalty)
        super().__init__(
            model=model, loss=loss, reference_model=reference_model, optimizer=optimizer, scheduler=scheduler,
            export_dir=export_dir, overwrite_export=overwrite_export, gradient_checkpointing=gradient_checkpointing,
            on_nonfinite=on_nonfinite, logprobs=logprobs, logprob_chunk_size=logprob_chunk_size,
            precompute_reference=False, lora=lora, share_prompt=share_prompt, reference_update=reference_update,
            disable_dropout=disable_dropout,
        )
        # again, here: the judge (a function or a model) stays out of the checkpoint's hyperparameters
        self.save_hyperparameters(ignore=["judge", "loss", "optimizer", "scheduler", "export_dir", "overwrite_export"])
        self.judge = judge
        self.num_samples = num_samples
        self.pairs = pairs
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.missing_eos_penalty = missing_eos_penalty
        self.generation_seed = generation_seed
        self.skipped_steps = 0
        self._pairs_since_step = False
        # validation: per-sample means, synced across processes
        self.val_online = torch.nn.ModuleDict(
            {name: MeanMetric() for name in ("score", "kl", "completion_length", "eos_fraction")}
        )
        # the KL estimate runs on single sequences: never the shared-prompt packing of pairs
        self.sequence_logprobs = LogProbSelector(logprobs, logprob_chunk_size, share_prompt=False)

    @staticmethod
    def check_settings(
        judge: Any, loss: PreferenceLoss | None, num_samples: int, pairs: str, max_new_tokens: int,
        temperature: float, top_p: float, top_k: int, missing_eos_penalty: float | None,
    ) -> None:
        """Refuse unusable settings before any model is loaded, naming the recipe key."""
        if not isinstance(judge, (Judge, PairwiseJudge)):
            raise TypeError(
                f"{MODEL_KEY}.judge must be a dpo_lightning.judges.Judge or PairwiseJudge (e.g. class_path: "
                f"dpo_lightning.judges.FunctionJudge, init_args: {{path: module:function}}), got {type(judge).__name__}"
            )
        if loss is not None:
            if not loss.pairwise:
                raise ValueError(
                    f"{MODEL_KEY}.loss: {type(loss).__name__} trains on unpaired rows ({loss.batch_layout.value}); "
                    "online training forms pairs from the policy's samples: use a pairwise loss "
                    "(DPOLoss, IPOLoss, ODPOLoss, SimPOLoss, ...)"
                )
            other = [c for c in loss.score_columns if c not in SCORE_COLUMNS]
            if other:
                raise ValueError(
                    f"{MODEL_KEY}.loss: {type(loss).__name__} reads {other} from each pair; online batches carry only "
                    f"the judge's scores as {list(SCORE_COLUMNS)}"
                )
        if not (isinstance(num_samples, int) and num_samples >= 2):
            raise ValueError(f"{MODEL_KEY}.num_samples must be an int >= 2 (a pair needs two samples), got {num_samples!r}")
        if pairs not in ("best_vs_worst", "all"):
            raise ValueError(f"{MODEL_KEY}.pairs must be best_vs_worst or all, got {pairs!r}")
        if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
            raise ValueError(f"{MODEL_KEY}.max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"{MODEL_KEY}.temperature must be > 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"{MODEL_KEY}.top_p must be in (0, 1], got {top_p}")
        if not (isinstance(top_k, int) and top_k >= 0):
            raise ValueError(f"{MODEL_KEY}.top_k must be an int >= 0 (0 is off), got {top_k!r}")
        if missing_eos_penalty is not None and not math.isfinite(missing_eos_penalty):
            raise ValueError(f"{MODEL_KEY}.missing_eos_penalty must be a finite number or null, got {missing_eos_penalty}")

    @property
    def data_requirements(self) -> DataRequirements:
        """Prompts alone (the pairs are sampled here), and the policy's position limit."""
        return DataRequirements(BatchLayout.PROMPTS).with_model_limit(self.policy)

    # -- sampling -------------------------------------------------------------------------------
    def stop_token_ids(self) -> list[int]:
        """The tokenizer's EOS, then any other EOS of the policy's ``generation_config``."""
        ids = [int(self.tokenizer.eos_token_id)]
        configured = getattr(getattr(self.policy, "generation_config", None), "eos_token_id", None)
        for token in configured if isinstance(configured, (list, tuple)) else [configured]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
        return ids

    def seed_for(self, stage: int, batch_idx: int) -> int:
        """The sampling seed of one batch: the base seed, stage (0 train, 1 val), global step,
        batch index and rank."""
        base = self.generation_seed if self.generation_seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        rank = self.global_rank if self._trainer is not None else 0
        return generation_seed(base, stage, self.global_step if self._trainer is not None else 0, batch_idx, rank)

    def check_positions(self, prompt_width: int) -> None:
        limit = getattr(self.policy.config, "max_position_embeddings", None)
        if isinstance(limit, int) and prompt_width + self.max_new_tokens > limit:
            raise ValueError(
                f"a prompt of {prompt_width} tokens plus {MODEL_KEY}.max_new_tokens={self.max_new_tokens} exceeds the "
                f"model's {limit} positions (max_position_embeddings); lower max_new_tokens or "
                f"data.init_args.max_prompt_length so that they add up to at most {limit}"
            )

    def sample(self, batch: dict[str, Any], num_samples: int, seed: int, exact: bool = False) -> OnlineSamples:
        """``num_samples`` completions for each prompt of a ``PROMPTS`` batch from the policy
        (:func:`sample_completions` with this module's settings).

        Args:
            batch: ``input_ids`` / ``attention_mask`` ``(B, T)`` left-padded, ``prompt`` (``B`` prompts).
            num_samples: ``k``.
            seed: seeds a forked RNG (the run's own stream is left as it was); see :meth:`seed_for`.
            exact: ancestral sampling (temperature 1, no top-k / top-p) instead of the
                configured settings (validation's KL estimate needs samples from the policy).
        """
        self.check_positions(int(batch["attention_mask"].sum(-1).max()))
        settings = {"temperature": 1.0, "top_p": 1.0, "top_k": 0} if exact else {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
        }
        return sample_completions(
            self.policy, self.tokenizer, batch, num_samples, seed=seed, max_new_tokens=self.max_new_tokens,
            stop_ids=self.stop_token_ids(), **settings,
        )

    def judge_samples(self, samples: OnlineSamples) -> Tensor:
        """``(B * k,)`` float32 scores of the samples (after ``missing_eos_penalty``)."""
        if isinstance(self.judge, PairwiseJudge):
            scores = pairwise_win_rates(self.judge, samples)
        else:
            scores = self.judge.score(samples.prompts_per_sample(), samples.texts).float().cpu()
        if scores.shape != (len(samples.texts),):
            raise ValueError(f"the judge returned scores of shape {tuple(scores.shape)} for {len(samples.texts)} completions")
        if self.missing_eos_penalty is not None:
            scores = scores - self.missing_eos_penalty * (~torch.tensor(samples.has_eos)).float()
        return scores

    # -- training --------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        samples = self.sample(batch, self.num_samples, self.seed_for(0, batch_idx))
        scores = self.judge_samples(samples)
        n_prompts = len(samples.prompts)
        pairs, ties = form_pairs(scores.view(n_prompts, self.num_samples), self.pairs)
        lengths = torch.tensor([len(c) for c in samples.completion_ids], dtype=torch.float32)
        online = {
            "score_mean": scores.mean(),
            "completion_length": lengths.mean(),
            "eos_fraction": torch.tensor(samples.has_eos, dtype=torch.float32).mean(),
            "tied_pairs": torch.tensor(float(ties)),
            "pairs": torch.tensor(float(len(pairs))),
        }
        if pairs:
            flat = scores.double().tolist()
            k = self.num_samples
            online["score_chosen"] = torch.tensor([flat[i * k + c] for i, c, _ in pairs]).mean().float()
            online["score_rejected"] = torch.tensor([flat[i * k + r] for i, _, r in pairs]).mean().float()
        for name, value in online.items():
            self.log(f"train/online/{name}", value, batch_size=n_prompts)
        if not pairs:
            self._rows_since_step += batch["row_id"].tolist()
            params = [p for p in self.trained_model().parameters() if p.requires_grad]
            return sum((p.sum() * 0.0 for p in params), torch.zeros((), device=self.device))
        self._pairs_since_step = True
        pair_batch = build_pair_batch(samples, pairs, scores, batch["row_id"].tolist(), self.tokenizer.pad_token_id)
        pair_batch = {name: value.to(self.device) for name, value in pair_batch.items()}
        return super().training_step(pair_batch, batch_idx)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        had_pairs, self._pairs_since_step = self._pairs_since_step, False
        if not self.trainer.strategy.reduce_boolean_decision(not had_pairs, all=True):
            return  # some process trained on a pair: every process steps (DDP keeps them equal)
        for param in self.trained_model().parameters():
            param.grad = None  # optimizers skip parameters without a gradient: no update at all
        self.skipped_steps += 1
        rank_zero_info(f"step {self.global_step}: no sample pair with different scores in any batch; step skipped")
        self.log("train/online/skipped_steps", float(self.skipped_steps), rank_zero_only=True)

    # -- validation ------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        samples = self.sample(batch, 1, self.seed_for(1, batch_idx), exact=True)
        metrics = self.val_online
        metrics["completion_length"].update(torch.tensor([len(c) for c in samples.completion_ids], dtype=torch.float32))
        metrics["eos_fraction"].update(torch.tensor(samples.has_eos, dtype=torch.float32))
        if isinstance(self.judge, Judge):
            metrics["score"].update(self.judge.score(samples.prompts, samples.texts).float())
        if self.loss.needs_reference:
            sequences = pad_sequences(samples.prompt_ids, samples.completion_ids, self.tokenizer.pad_token_id)
            sequences = {name: value.to(self.device) for name, value in sequences.items()}
            strategy = self.trainer.strategy if self._trainer is not None else None

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

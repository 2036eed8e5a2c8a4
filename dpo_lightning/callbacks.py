"""Lightning callbacks.

:class:`LogCompletions`: after a validation, sample one completion per prompt from the policy,
score it with a judge if one is given, and log the table prompt / completion / score (as TRL's
``LogCompletionsCallback``). In a recipe::

    trainer:
      callbacks:
        - class_path: dpo_lightning.callbacks.LogCompletions
          init_args:
            prompts: data/sentiment/eval_prompts.jsonl
            num_prompts: 8
            max_new_tokens: 24
            judge:
              class_path: dpo_lightning.judges.FunctionJudge
              init_args: {path: dpo_lightning.experiments.sentiment:score}

:class:`ExportSnapshots`: every ``every_n_steps`` optimizer steps, export the trained model as
the end of ``fit`` does (safetensors, tokenizer, ``reference.json``) to ``dirpath/step-N``: a
trajectory of policies that ``dpo-lightning-evaluate`` or ``validate`` reads one by one::

    trainer:
      callbacks:
        - class_path: dpo_lightning.callbacks.ExportSnapshots
          init_args: {dirpath: outputs/dpo/snapshots, every_n_steps: 50}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from .data.formats import kind_of
from .data.loading import load_rows
from .generation import (
    Samples, check_positions, encode_prompt, generating_model, generation_seed, judge_samples, left_padded,
    position_limit, sample_completions, stop_token_ids, write_jsonl,
)
from .judges import Judge, PairwiseJudge, Prompt

#: how the callback is named in errors
KEY = "trainer.callbacks: LogCompletions"
#: the table's columns, in order
COLUMNS = ("prompt", "completion", "score")


def prompt_text(prompt: Prompt) -> str:
    """A prompt for display: the string, or each message as ``role: content`` on its own line."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """``rows`` (``prompt``, ``completion``, ``score``) as a Markdown table (TensorBoard's text
    plugin renders it); ``|`` is escaped and line breaks become ``<br>``."""
    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.4g}"
        text = prompt_text(value) if isinstance(value, (str, list)) else str(value)
        return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


class LogCompletions(Callback):
    """Sample and log completions of a few prompts after validations.

    After every ``every_n_val``-th validation (the sanity check counts, so the first table shows
    the policy before training): one completion per prompt from the module's policy
    (``PreferenceModule``, ``SFTModule``, ``OnlinePreferenceModule``; a ``RewardModule`` trains
    no policy and is refused at setup), greedy (default) or sampled with a fixed seed, cut at
    the first EOS and decoded without special tokens; scored by ``judge`` if given. Conversational
    prompts go through the chat template with the generation prompt, string prompts get the
    tokenizer's leading special tokens (the rules of online training's
    :class:`~dpo_lightning.data.PromptDataModule`).

    The table (``step``, ``prompt``, ``completion``, ``score``; ``score`` null without a judge)
    is always written to ``<log_dir>/completions/step_<N>.jsonl`` (``trainer.log_dir``: the
    CSV or TensorBoard logger's version folder, ``default_root_dir`` without a logger; ``N`` is
    the global step, a second validation at the same step overwrites it), and also logged to
    the loggers that can hold a table: TensorBoard (``add_text`` with a Markdown table under
    ``key``), Weights & Biases (``log_table`` under ``key``); for the CSV logger that file is
    the record. Generation runs on global rank 0 only (under DDP the other processes wait at
    their next collective); not under FSDP or DeepSpeed ZeRO-3, where ``generate`` needs the
    full weights.

    Args:
        prompts: a file or dataset with a ``prompt`` column (what ``data.init_args.train_data``
            accepts: .jsonl/.json/.parquet, a folder, a hub id), or a list of prompts (strings
            or conversations). The first ``num_prompts`` are used.
        num_prompts: how many prompts, >= 1. Default 8.
        max_new_tokens: most tokens per completion, >= 1. Default 64; the longest prompt plus
            this must fit the model's ``max_position_embeddings``.
        judge: a pointwise :class:`~dpo_lightning.judges.Judge` (``FunctionJudge``,
            ``RewardModelJudge``) or ``None`` (no scores).
        every_n_val: log after every n-th validation, >= 1. Default 1.
        do_sample: ``False`` (default): greedy decoding. ``True``: ancestral sampling at
            ``temperature`` with the fixed ``seed`` every time, so tables of different steps
            differ by the policy, not by the random draws.
        temperature: > 0, for ``do_sample``.
        seed: the sampling seed.
        batch_size: prompts per ``generate`` call.
        chat_template_kwargs: extra variables for the chat template.
        key: the name of the table in the loggers.
    """

    def __init__(
        self,
        prompts: str | list[str | list[dict[str, str]]],
        num_prompts: int = 8,
        max_new_tokens: int = 64,
        judge: Judge | None = None,
        every_n_val: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int = 0,
        batch_size: int = 8,
        chat_template_kwargs: dict[str, Any] | None = None,
        key: str = "completions",
    ) -> None:
        for name, value in (("num_prompts", num_prompts), ("max_new_tokens", max_new_tokens),
                            ("every_n_val", every_n_val), ("batch_size", batch_size)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{KEY}.{name} must be an int >= 1, got {value!r}")
        if not temperature > 0:
            raise ValueError(f"{KEY}.temperature must be > 0, got {temperature}")
        if judge is not None and not isinstance(judge, Judge):
            kind = "compares two completions" if isinstance(judge, PairwiseJudge) else "is not a Judge"
            raise TypeError(
                f"{KEY}.judge: {type(judge).__name__} {kind}; LogCompletions scores each completion on its own "
                "(a Judge: FunctionJudge, RewardModelJudge), or give none"
            )
        self.prompts = self.read(prompts, num_prompts)
        self.max_new_tokens = max_new_tokens
        self.judge = judge
        self.every_n_val = every_n_val
        self.do_sample = do_sample
        self.temperature = float(temperature)
        self.seed = seed
        self.batch_size = batch_size
        self.chat_template_kwargs = chat_template_kwargs
        self.key = key
        self.validations = 0
        self.prompt_ids: list[list[int]] = []
        self.last_path: Path | None = None

    @staticmethod
    def read(prompts: str | Sequence[Prompt], n: int) -> list[Prompt]:
        """The first ``n`` prompts of a file / dataset with a ``prompt`` column, or of a list."""
        if isinstance(prompts, str):
            rows = load_rows(prompts, key=f"{KEY}.prompts", max_rows=n)
            if "prompt" not in rows.column_names:
                raise ValueError(f"{KEY}.prompts {prompts!r} has no 'prompt' column; found {rows.column_names}")
            values = list(rows["prompt"])
        else:
            values = list(prompts)[:n]
        for i, value in enumerate(values):
            if kind_of(value) is None:
                raise ValueError(
                    f"{KEY}.prompts: prompt {i} is neither a string nor a conversation (a list of {{role, content}} "
                    f"messages): {value!r:.200}"
                )
        if not values:
            raise ValueError(f"{KEY}.prompts holds no prompts")
        return values

    # -- hooks ----------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        policy = generating_model(pl_module, "LogCompletions")  # refuses a RewardModule
        tokenizer = pl_module.tokenizer
        self.prompt_ids = [
            encode_prompt(tokenizer, p, self.chat_template_kwargs, where=f"{KEY}.prompts[{i}]")
            for i, p in enumerate(self.prompts)
        ]
        check_positions(max(map(len, self.prompt_ids)), self.max_new_tokens, position_limit(policy),
                        f"{KEY}.max_new_tokens", "use shorter prompts")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.validations += 1
        if (self.validations - 1) % self.every_n_val:
            return
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "completions"  # a collective: every rank
        if trainer.global_rank != 0:
            return
        rows = self.completions(pl_module)
        step = int(trainer.global_step)
        self.last_path = write_jsonl(folder / f"step_{step}.jsonl", [{"step": step, **r} for r in rows])
        self.publish(trainer, rows, step)
        scored = [r["score"] for r in rows if r["score"] is not None]
        mean = f", mean score {sum(scored) / len(scored):.3f}" if scored else ""
        rank_zero_info(f"LogCompletions: {len(rows)} completions at step {step}{mean} -> {self.last_path}")

    @property
    def state_key(self) -> str:
        """Two LogCompletions with different ``key`` keep apart in a checkpoint."""
        return self._generate_state_key(key=self.key)

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))

    # -- the work -------------------------------------------------------------------------------------
    def completions(self, pl_module: L.LightningModule) -> list[dict[str, Any]]:
        """``{"prompt", "completion", "score"}`` for each prompt, from the module's current policy."""
        policy = generating_model(pl_module, "LogCompletions")
        tokenizer = pl_module.tokenizer
        device = next(policy.parameters()).device
        stops = stop_token_ids(policy, tokenizer)
        settings = {"temperature": self.temperature, "top_p": 1.0, "top_k": 0} if self.do_sample else {
            "temperature": 1.0, "top_p": 1.0, "top_k": 1,  # one candidate token: greedy decoding
        }
        prompt_ids: list[list[int]] = []
        completions: list[list[int]] = []
        texts: list[str] = []
        for start in range(0, len(self.prompts), self.batch_size):
            padded = left_padded(self.prompt_ids[start : start + self.batch_size], tokenizer.pad_token_id)
            batch = {**{n: v.to(device) for n, v in padded.items()}, "prompt": self.prompts[start : start + self.batch_size]}
            samples = sample_completions(
                policy, tokenizer, batch, 1, seed=generation_seed(self.seed, start), max_new_tokens=self.max_new_tokens,
                stop_ids=stops, **settings,
            )
            prompt_ids += samples.prompt_ids
            completions += samples.completion_ids
            texts += samples.texts
        scores: list[float | None] = [None] * len(texts)
        if self.judge is not None:
            self.judge.to(device)
            everything = Samples(prompt_ids, completions, [True] * len(texts), texts, list(self.prompts), 1)
            scores = [float(v) for v in judge_samples(self.judge, everything).tolist()]
        return [{"prompt": p, "completion": t, "score": s} for p, t, s in zip(self.prompts, texts, scores)]

    def publish(self, trainer: L.Trainer, rows: list[dict[str, Any]], step: int) -> None:
        """Log the table to each logger that can hold one (TensorBoard text, W&B table); the CSV
        logger's record is the jsonl file under its log_dir (written again there if that is
        not ``trainer.log_dir``)."""
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(self.key, markdown_table(rows), global_step=step)
            elif isinstance(logger, WandbLogger):
                data = [[prompt_text(r["prompt"]), r["completion"], r["score"]] for r in rows]
                logger.log_table(key=self.key, columns=list(COLUMNS), data=data, step=step)
            elif isinstance(logger, CSVLogger):
                target = Path(logger.log_dir) / "completions" / f"step_{step}.jsonl"
                if self.last_path is None or target.resolve() != self.last_path.resolve():
                    write_jsonl(target, [{"step": step, **r} for r in rows])


class ExportSnapshots(Callback):
    """Export the trained model every ``every_n_steps`` optimizer steps to ``dirpath/step-N``
    (``N`` the global step, zero-padded to 6 digits so the folders sort in training order).

    The export is the module's own (:meth:`AlignmentModule.export`: full weights gathered under
    FSDP, written on rank 0, atomic); a snapshot that exists already is refused unless the
    module's ``overwrite_export`` is set, as the final export is. Steps are counted once each,
    also under gradient accumulation (``on_train_batch_end`` runs per micro-batch)."""

    def __init__(self, dirpath: str, every_n_steps: int) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"trainer.callbacks: ExportSnapshots every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.last_step = -1

    def path(self, step: int) -> Path:
        return self.dirpath / f"step-{step:06d}"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.last_step or step == 0 or step % self.every_n_steps:
            return
        self.last_step = step
        state = pl_module.gathered_state_dict()  # collective under FSDP: every rank takes part
        pl_module.export(str(self.path(step)), state)
        trainer.strategy.barrier("snapshot")


__all__ = ["ExportSnapshots", "LogCompletions", "markdown_table"]

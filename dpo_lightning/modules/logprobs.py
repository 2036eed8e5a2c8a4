"""Per-sequence log-probabilities of completion tokens: every module and command computes them
through :class:`LogProbSelector`, which picks one of three paths.

* :func:`model_logprobs`: the model's full ``(N, T, V)`` logits (any model, any strategy);
* :func:`chunked_model_logprobs`: the LM head only at completion positions, chunked, with
  recomputation in backward (plain linear heads; not under FSDP);
* :func:`shared_prompt_model_logprobs`: as chunked, with each pair's prompt run once.

Each returns :class:`SequenceLogProbs` with ``(N,)`` sums and counts, and, when asked
(``with_tokens=True``), the ``(N, T - 1)`` per-token values and their mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor

from ..contract import PairRows
from ..losses.base import SequenceLogProbs
from .attention import attention_kernels
from .liger_head import liger_target_logprobs, use_liger_head

LogProbMode = Literal["auto", "chunked", "full"]

#: ``logprob_chunk_size: auto`` on a CPU: positions per chunk such that a ``(chunk, V)`` float32
#: block holds about this many values (32 MB). At vocab 32k (262 positions) it measured 1.11x end to
#: end against 1024 positions (a 131 MB block: every element-wise pass over it went to memory);
#: 128 and 512 positions were slower than 256 (``benchmarks/ab.py``, see benchmarks/README.md)
CPU_CHUNK_VALUES = 2**23
#: bounds of the automatic chunk: at vocab 2k, 1024 and 4096 positions measured the same, 64 was
#: slower than 256 at 32k; off the CPU (not measured) ``auto`` is the upper bound, as before
CHUNK_POSITIONS = (64, 1024)

#: architectures whose decoder takes the shared layout's 4D mask and position ids as given, so
#: ``share_prompt: auto`` may use it (each is tested equal to the plain layout; GPT-2, for one, is not)
SHARED_PROMPT_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo", "olmo2", "stablelm", "gpt_neox"}
)


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """``log softmax(logits)[target]`` per position, in float32 (or float64 if given).

    Args:
        logits: ``(N, T, V)``.
        targets: ``(N, T)`` long.
    Returns:
        ``(N, T)`` log-probs.
    """
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def log_square_mass(logits: Tensor) -> Tensor:
    """``log sum_v softmax(logits)_v^2`` over the last dimension, detached, in float32 (float64
    if given): ``logsumexp(2 logits) - 2 logsumexp(logits)``. ``(..., V)`` -> ``(...)``."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return torch.logsumexp(2 * logits, dim=-1) - 2 * torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def chunked_log_square_mass(hidden: Tensor, weight: Tensor, chunk_size: int) -> Tensor:
    """:func:`log_square_mass` of ``hidden @ weight.T`` ``(M, H) x (V, H)`` -> ``(M,)``, ``chunk_size``
    positions at a time (no ``(M, V)`` logits held)."""
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        out[start : start + chunk_size] = log_square_mass((hidden[start : start + chunk_size] @ weight.T).to(dtype))
    return out


def logits_to_completion_logprobs(
    logits: Tensor, input_ids: Tensor, completion_mask: Tensor, with_tokens: bool = False,
    with_square_mass: bool = False,
) -> SequenceLogProbs:
    """Sum log-probs of completion tokens; prompt and padding contribute nothing.

    Position ``t`` of ``logits`` predicts token ``t + 1`` of ``input_ids``.

    Args:
        logits: ``(N, T, V)`` model outputs.
        input_ids: ``(N, T)``.
        completion_mask: ``(N, T)``, 1 on completion tokens.
        with_tokens: also return the ``(N, T - 1)`` per-token values and mask.
        with_square_mass: also return ``square_mass`` ``(N,)`` (:func:`log_square_mass` summed
            over completion positions).
    Returns:
        :class:`SequenceLogProbs` with ``(N,)`` sums and counts.
    """
    mask = completion_mask[:, 1:].bool()
    per_token = token_logprobs(logits[:, :-1], input_ids[:, 1:]).masked_fill(~mask, 0.0)
    square_mass = log_square_mass(logits[:, :-1]).masked_fill(~mask, 0.0).sum(-1) if with_square_mass else None
    return SequenceLogProbs(
        sums=per_token.sum(-1), counts=mask.sum(-1),
        tokens=per_token if with_tokens else None, token_mask=mask if with_tokens else None,
        square_mass=square_mass,
    )


def model_logprobs(
    model: torch.nn.Module, batch: Mapping[str, Tensor], with_tokens: bool = False, with_square_mass: bool = False
) -> SequenceLogProbs:
    """One forward pass of a causal LM over the whole batch (chosen and rejected together)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return logits_to_completion_logprobs(
        out.logits, batch["input_ids"], batch["completion_mask"], with_tokens, with_square_mass
    )


def autocast_compute_dtype(tensor: Tensor) -> torch.dtype | None:
    """The dtype autocast would run a matmul of ``tensor`` in right now, or ``None`` when autocast
    is off for ``tensor``'s device type (or ``tensor`` is float64, which autocast leaves alone).

    A custom autograd Function's backward runs outside the caller's autocast region, so
    :class:`ChunkedTargetLogProbs` records this in forward and casts explicitly in both passes.
    """
    device_type = tensor.device.type
    if tensor.dtype == torch.float64 or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


class ChunkedTargetLogProbs(torch.autograd.Function):
    """``log softmax(h W^T)[y]`` for ``M`` positions without holding ``(M, V)`` logits.

    Forward and backward both walk over chunks of ``chunk_size`` positions; backward
    recomputes each chunk's logits (``d/dlogits = g * (onehot(y) - softmax)``), so peak extra
    memory is one ``(chunk_size, V)`` float32 block instead of ``(M, V)``.

    Precision: outside autocast (or in float64) every matmul runs in the inputs' dtype. Under
    autocast (``bf16-mixed``, ``16-mixed``), forward records the autocast dtype and both passes
    run their three GEMMs (logits, ``dlogits @ W``, ``dlogits^T @ h``) in it, as autocast runs an
    ``nn.Linear``; the log-softmax (logsumexp, softmax, the ``onehot - softmax`` step) and the
    accumulation of the weight gradient over chunks are float32.

    Args:
        hidden: ``(M, H)`` final hidden states at the positions that predict a target.
        weight: ``(V, H)`` LM-head weight (no bias).
        targets: ``(M,)`` long.
        chunk_size: positions per chunk.
    Returns:
        ``(M,)`` float32 (float64 if ``hidden`` is float64) log-probs.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int) -> Tensor:  # type: ignore[override]
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        compute = autocast_compute_dtype(hidden)
        out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight if compute is None else weight.to(compute)
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start : start + chunk_size]
                logits = ((h if compute is None else h.to(compute)) @ w.T).to(dtype)
                out[start : start + chunk_size] = token_logprobs(logits, targets[start : start + chunk_size])
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_size = chunk_size
        ctx.compute = compute
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        hidden, weight, targets = ctx.saved_tensors
        compute: torch.dtype | None = ctx.compute
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32 if weight.dtype != torch.float64 else weight.dtype) \
            if ctx.needs_input_grad[1] else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight if compute is None else weight.to(compute)
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                h = hidden[start : start + ctx.chunk_size]
                h = h if compute is None else h.to(compute)
                y = targets[start : start + ctx.chunk_size]
                g = grad_out[start : start + ctx.chunk_size]
                # softmax reads the bf16 logits and writes float32: no separate float32 copy of the block
                dlogits = torch.softmax(h @ w.T, dim=-1, dtype=grad_out.dtype).mul_(-g[:, None])  # in place: one pass, not two
                dlogits[torch.arange(len(y), device=y.device), y] += g
                dlogits = dlogits.to(h.dtype)
                if grad_hidden is not None:
                    grad_hidden[start : start + ctx.chunk_size] = dlogits @ w
                if grad_weight is not None:
                    grad_weight += (dlogits.T @ h).to(grad_weight.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def target_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
    """``(M,)`` float32 log-probs of ``targets`` from ``(M, H)`` hidden states through the
    ``(V, H)`` head: :class:`ChunkedTargetLogProbs`, or on CUDA for a gradient-free pass with
    liger-kernel installed, liger's fused kernel (:mod:`.liger_head`) in the autocast dtype."""
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if use_liger_head(hidden.device.type, needs_grad):
        compute = autocast_compute_dtype(hidden)
        if compute is not None:
            hidden, weight = hidden.to(compute), weight.to(compute)
        return liger_target_logprobs(hidden, weight, targets)
    return ChunkedTargetLogProbs.apply(hidden, weight, targets, chunk_size)


def supports_chunked_logprobs(model: torch.nn.Module) -> bool:
    """True when ``logits == lm_head(decoder(x))`` with a plain bias-free linear head.

    Models that scale or soft-cap logits (Gemma 2's ``final_logit_softcapping``, Cohere's
    ``logit_scale``, Granite's ``logits_scaling`` other than 1) or have a biased or adapted head
    use the full-logits path.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    if getattr(config, "logits_scaling", 1.0) not in (None, 1, 1.0):
        return False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return (
        isinstance(head, torch.nn.Linear) and type(head) is torch.nn.Linear and head.bias is None
        and decoder is not None and decoder is not model
    )


def chunked_model_logprobs(
    model: torch.nn.Module, batch: Mapping[str, Tensor], chunk_size: int = 1024, with_tokens: bool = False,
    with_square_mass: bool = False,
) -> SequenceLogProbs:
    """Like :func:`model_logprobs`, but the LM head runs only at completion positions, chunked.

    The decoder runs once over the batch; of its ``(N, T, H)`` hidden states only the ``M``
    positions that predict a completion token go through the head, ``chunk_size`` at a time,
    with recomputation in backward (:class:`ChunkedTargetLogProbs`). Prompt and padding
    positions never produce logits.
    """
    decoder = model.get_decoder()
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    mask = batch["completion_mask"][:, 1:].bool()
    rows, columns = mask.nonzero(as_tuple=True)  # one host sync (the count); boolean indexing took three
    picked = hidden[rows, columns]  # row-major, as hidden[:, :-1][mask]; backward needs no second nonzero
    targets = batch["input_ids"][:, 1:][rows, columns]
    weight = model.get_output_embeddings().weight
    token = target_logprobs(picked, weight, targets, chunk_size)
    sums = torch.zeros(mask.shape[0], dtype=token.dtype, device=token.device).index_add(0, rows, token)
    square_mass = None
    if with_square_mass:
        square_mass = torch.zeros_like(sums).index_add(0, rows, chunked_log_square_mass(picked, weight, chunk_size))
    if not with_tokens:
        return SequenceLogProbs(sums=sums, counts=mask.sum(-1), square_mass=square_mass)
    tokens = torch.zeros(mask.shape, dtype=token.dtype, device=token.device).masked_scatter(mask, token)
    return SequenceLogProbs(sums=sums, counts=mask.sum(-1), tokens=tokens, token_mask=mask, square_mass=square_mass)


def prompt_groups(batch: Mapping[str, Tensor]) -> list[list[int]]:
    """The rows of ``batch`` that share a prompt, each group in row order: by ``prompt_group``
    ``(N,)`` where the batch has one (the samples layout: a prompt's distinct samples), else
    the pairs ``[i, B + i]`` of a ``(2B, T)`` ``[chosen; rejected]`` batch."""
    if "prompt_group" in batch:
        groups: dict[int, list[int]] = {}
        for row, group in enumerate(batch["prompt_group"].tolist()):
            groups.setdefault(group, []).append(row)
        return list(groups.values())
    b = batch["input_ids"].shape[0] // 2
    return [[i, b + i] for i in range(b)]


def pack_shared_prompt(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Lay out each group of rows sharing a prompt (:func:`prompt_groups`: a pair, or a prompt's
    samples) as one row ``[prompt; completion 1; completion 2; ...]`` so the prompt is run once.

    From the usual right-padded ``(N, T)`` batch, for group ``g`` with prompt ``p`` (length
    ``P``) and completions ``c_1 .. c_m`` (lengths ``C_j``), builds, right-padded to
    ``L = max(P + sum C_j)``:

    * ``ids`` ``(G, L)``; ``positions`` ``(G, L)``: ``0..P-1`` for the prompt, ``P..P+C_j-1``
      for each completion (each sits where it would after the prompt);
    * ``segment`` ``(G, L)``: 0 prompt, ``j`` completion ``j`` (chosen 1, rejected 2 for a pair),
      -1 padding;
    * ``predictor`` ``(G, L)``: the position whose output predicts each token (``i - 1``, but
      the first token of every completion after the first is predicted from the last prompt token);
    * ``side`` ``(G, L)``: the row in ``[0, N)`` of the usual layout each completion token counts for.

    Raises:
        ValueError: rows of one ``prompt_group`` whose prompts differ.
    """
    input_ids, attention, completion = batch["input_ids"], batch["attention_mask"].bool(), batch["completion_mask"].bool()
    groups = prompt_groups(batch)
    checked = "prompt_group" in batch  # a collated pair shares its prompt by construction
    prompt_len = (attention & ~completion).sum(-1).tolist()
    completion_len = completion.sum(-1).tolist()
    width = max(prompt_len[g[0]] + sum(completion_len[r] for r in g) for g in groups)
    device = input_ids.device
    shape = (len(groups), width)
    ids = torch.zeros(shape, dtype=input_ids.dtype, device=device)
    positions = torch.zeros(shape, dtype=torch.long, device=device)
    segment = torch.full(shape, -1, dtype=torch.long, device=device)
    predictor = torch.arange(-1, width - 1, device=device).repeat(len(groups), 1)
    side = torch.zeros(shape, dtype=torch.long, device=device)
    for g, rows in enumerate(groups):
        p = prompt_len[rows[0]]
        if checked and any(prompt_len[r] != p or not torch.equal(input_ids[r, :p], input_ids[rows[0], :p]) for r in rows[1:]):
            raise ValueError(f"rows {rows} share a prompt group but not their prompt tokens")
        ids[g, :p] = input_ids[rows[0], :p]
        positions[g, :p] = torch.arange(p, device=device)
        segment[g, :p] = 0
        start = p
        for j, r in enumerate(rows, start=1):
            c = completion_len[r]
            end = start + c
            ids[g, start:end] = input_ids[r, p : p + c]
            positions[g, start:end] = torch.arange(p, p + c, device=device)
            segment[g, start:end] = j
            side[g, start:end] = r
            if c and start != p:
                predictor[g, start] = p - 1
            start = end
    return {"ids": ids, "positions": positions, "segment": segment, "predictor": predictor, "side": side}


def shared_prompt_mask(segment: Tensor, dtype: torch.dtype) -> Tensor:
    """``(G, 1, L, L)`` additive mask: causal, a completion's tokens see the prompt and their own
    completion only (a rejected response does not see the chosen one), padding is seen by
    nobody (each padding row sees itself, so no softmax row is empty)."""
    length = segment.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment.device).tril()
    query, key = segment[:, :, None], segment[:, None, :]
    allowed = causal[None] & (key >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(length, dtype=torch.bool, device=segment.device)[None] & (query < 0)
    return torch.zeros(allowed.shape, dtype=dtype, device=segment.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )[:, None]


def shared_prompt_model_logprobs(
    model: torch.nn.Module, batch: Mapping[str, Tensor], chunk_size: int = 1024, with_tokens: bool = False,
    with_square_mass: bool = False,
) -> SequenceLogProbs:
    """:func:`chunked_model_logprobs` with each group's prompt computed once: a pair's instead of
    twice, a prompt's ``k`` samples' (``prompt_group`` in ``batch``) instead of ``k`` times.

    The group is one row ``[prompt; completion 1; ...]`` (:func:`pack_shared_prompt`) with a 4D
    attention mask that hides each completion from the others and position ids that restart
    each completion after the prompt, so every completion token sees exactly what it sees in
    the plain layout.
    Needs an attention implementation that takes 4D masks (``sdpa``, ``eager``; not flash-attention).
    """
    packed = pack_shared_prompt(batch)
    decoder = model.get_decoder()
    weight = model.get_output_embeddings().weight
    mask = shared_prompt_mask(packed["segment"], weight.dtype if weight.is_floating_point() else torch.float32)
    hidden = decoder(
        input_ids=packed["ids"], attention_mask=mask, position_ids=packed["positions"], use_cache=False
    ).last_hidden_state
    is_target = packed["segment"] > 0
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand_as(is_target)[is_target]
    picked = hidden[rows, packed["predictor"][is_target]]
    token = target_logprobs(picked, weight, packed["ids"][is_target], chunk_size)
    n = batch["input_ids"].shape[0]
    sums = torch.zeros(n, dtype=token.dtype, device=token.device).index_add(0, packed["side"][is_target], token)
    counts = torch.zeros(n, dtype=torch.long, device=token.device).index_add(
        0, packed["side"][is_target], torch.ones_like(packed["side"][is_target])
    )
    square_mass = None
    if with_square_mass:
        square_mass = torch.zeros_like(sums).index_add(
            0, packed["side"][is_target], chunked_log_square_mass(picked, weight, chunk_size)
        )
    if not with_tokens:
        return SequenceLogProbs(sums=sums, counts=counts, square_mass=square_mass)
    # a completion token sits at the same position in the plain layout: column position - 1
    index = (packed["side"][is_target], packed["positions"][is_target] - 1)
    shape = (n, batch["input_ids"].shape[1] - 1)
    tokens = torch.zeros(shape, dtype=token.dtype, device=token.device).index_put(index, token)
    return SequenceLogProbs(
        sums=sums, counts=counts, tokens=tokens, token_mask=batch["completion_mask"][:, 1:].bool(), square_mass=square_mass
    )


def shared_prompt_is_exact(model: torch.nn.Module, width: int) -> bool:
    """Whether :func:`shared_prompt_model_logprobs` gives the plain layout's values for ``model``
    on a batch ``width`` tokens wide: a listed architecture (:data:`SHARED_PROMPT_MODEL_TYPES`)
    with ``sdpa`` or ``eager`` attention and a plain linear head, whose sliding window (if any)
    is no shorter than the batch (the shared layout's mask has no window)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in SHARED_PROMPT_MODEL_TYPES:
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    window = getattr(config, "sliding_window", None)
    windowed = any(t != "full_attention" for t in getattr(config, "layer_types", None) or []) or (
        window is not None and getattr(config, "use_sliding_window", True) is not False
    )
    if windowed and (window is None or width > window):
        return False
    return supports_chunked_logprobs(model)


@dataclass
class LogProbSelector:
    """Chooses and runs the log-prob path for a model and a strategy; the one place that does.

    Args:
        mode: ``"chunked"`` (LM head only at completion positions, ``chunk_size`` at a time,
            recomputed in backward: no ``(N, T, V)`` logits are ever held), ``"full"`` (the
            model's logits), or ``"auto"`` (default): chunked where the model allows it (plain
            linear head, no logit scaling, see :func:`supports_chunked_logprobs`) and the
            strategy is not FSDP, whose root unit must run the full forward.
        chunk_size: positions per LM-head chunk (memory ~ chunk x vocab x 4 bytes), or
            ``"auto"`` (default): :meth:`positions_per_chunk`.
        share_prompt: for ``PAIRS`` batches, run each pair's prompt once
            (:func:`shared_prompt_model_logprobs`); needs the chunked path and ``sdpa`` /
            ``eager`` attention. ``"auto"``: on for pair batches on the CPU where the shared
            layout is exact (:func:`shared_prompt_is_exact`, decided per model and batch), off
            elsewhere (on CPUs it was measured 1.1-1.2x faster end to end; elsewhere not measured).
        pairs: batches are ``[chosen; rejected]`` pairs (set by :meth:`check`); ``"auto"``
            shares prompts only then.
    """

    mode: LogProbMode = "auto"
    chunk_size: int | Literal["auto"] = "auto"
    share_prompt: bool | Literal["auto"] = False
    pairs: bool = False

    def check(self, model: torch.nn.Module, pairwise: bool = True, key: str = "model.init_args") -> None:
        """Raise ``ValueError`` naming the recipe key when these settings cannot run on ``model``."""
        if self.mode not in ("auto", "chunked", "full"):
            raise ValueError(f"{key}.logprobs must be auto, chunked or full, got {self.mode!r}")
        if self.chunk_size != "auto" and (
            isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1
        ):
            raise ValueError(f"{key}.logprob_chunk_size must be auto or an integer >= 1, got {self.chunk_size!r}")
        if self.share_prompt not in (True, False, "auto"):
            raise ValueError(f"{key}.share_prompt must be true, false or auto, got {self.share_prompt!r}")
        self.pairs = pairwise
        if self.mode == "chunked" and not supports_chunked_logprobs(model):
            raise ValueError(
                f"{key}.logprobs: chunked needs a plain linear LM head without logit scaling; "
                "this model has none, use auto or full"
            )
        if self.share_prompt is True:
            problem = (
                "a pairwise loss" if not pairwise
                else "logprobs: auto or chunked" if self.mode == "full"
                else "a model with a plain linear LM head" if not supports_chunked_logprobs(model)
                else "sdpa or eager attention" if "flash" in str(getattr(model.config, "_attn_implementation", ""))
                else (f"an architecture whose values it is tested to keep ({', '.join(sorted(SHARED_PROMPT_MODEL_TYPES))}); "
                      f"{getattr(model.config, 'model_type', None)!r} is not one, so set it to auto or false")
                if getattr(model.config, "model_type", None) not in SHARED_PROMPT_MODEL_TYPES
                else None
            )
            if problem:
                raise ValueError(f"{key}.share_prompt needs {problem}")

    def positions_per_chunk(self, model: torch.nn.Module, device: torch.device) -> int:
        """The LM head's positions per chunk: ``chunk_size`` when given; for ``"auto"``, on a CPU
        about :data:`CPU_CHUNK_VALUES` logits a chunk (``2**23 // vocab``, within
        :data:`CHUNK_POSITIONS`: 1024 at vocab 2k, 262 at 32k, 64 at 152k), the block that stays
        in the processor's caches; on other devices 1024."""
        if self.chunk_size != "auto":
            return self.chunk_size
        low, high = CHUNK_POSITIONS
        if device.type != "cpu":
            return high
        vocab = model.get_output_embeddings().weight.shape[0]
        return max(low, min(high, CPU_CHUNK_VALUES // vocab))

    def chunked(self, model: torch.nn.Module, strategy: Any = None) -> bool:
        """Whether :meth:`__call__` takes the chunked path for ``model`` under ``strategy``."""
        if self.mode != "auto":
            return self.mode == "chunked"
        return not isinstance(strategy, FSDPStrategy) and supports_chunked_logprobs(model)

    def __call__(
        self, model: torch.nn.Module, batch: Mapping[str, Tensor], strategy: Any = None, with_tokens: bool = False,
        with_square_mass: bool = False,
    ) -> SequenceLogProbs:
        """Log-probs of ``batch``'s completion tokens under ``model`` (see the module docstring).

        Args:
            model: a causal LM.
            batch: ``input_ids``, ``attention_mask``, ``completion_mask`` ``(N, T)``.
            strategy: the Lightning strategy running the model (FSDP forces the full path).
            with_tokens: also return per-token values (``(N, T - 1)``).
            with_square_mass: also return ``square_mass`` ``(N,)`` (WPO's aligned weights).

        The attention kernels allowed are chosen for the batch's device
        (:func:`.attention.sdpa_backends`: no cuDNN attention on CUDA; the default elsewhere).
        """
        with attention_kernels(batch["input_ids"].device):
            if not self.chunked(model, strategy):
                return model_logprobs(model, batch, with_tokens, with_square_mass)
            chunk_size = self.positions_per_chunk(model, batch["input_ids"].device)
            if self.shares_prompt(model, batch):
                return shared_prompt_model_logprobs(model, batch, chunk_size, with_tokens, with_square_mass)
            return chunked_model_logprobs(model, batch, chunk_size, with_tokens, with_square_mass)

    def pair_rows(self, model: torch.nn.Module) -> PairRows:
        """How pair batches will run, told to the data module before the device is known (its
        length-grouped sampler groups by the width a pair takes): ``SHARED`` for
        ``share_prompt: true``, ``SHARED_ON_CPU`` for ``auto`` on a model whose shared layout is
        exact, ``SEPARATE`` otherwise (no pairs, ``logprobs: full``, ``share_prompt: false``).
        A sliding window shorter than a batch can still send that batch to the plain layout."""
        if not self.pairs or self.mode == "full" or self.share_prompt is False:
            return PairRows.SEPARATE
        if self.share_prompt is True:
            return PairRows.SHARED
        return PairRows.SHARED_ON_CPU if shared_prompt_is_exact(model, width=0) else PairRows.SEPARATE

    def shares_prompt(self, model: torch.nn.Module, batch: Mapping[str, Tensor]) -> bool:
        """Whether the chunked path runs ``batch`` in the shared-prompt layout."""
        grouped = "prompt_group" in batch  # the samples layout: a prompt's samples share it
        if not (self.pairs or grouped):
            return False
        if self.share_prompt != "auto":
            return bool(self.share_prompt)
        ids = batch["input_ids"]  # a completion sees the prompt and itself, as in its plain row of this width
        return ids.device.type == "cpu" and shared_prompt_is_exact(model, ids.shape[1])

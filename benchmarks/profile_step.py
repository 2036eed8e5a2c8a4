"""Where a dpo-lightning training step goes, on one thread (the ``small`` setting of throughput.py).

    python benchmarks/profile_step.py                          # vocab 2k, 128 pairs, 16 steps
    python benchmarks/profile_step.py --setting large --share-prompt false --torch-profile

Three measurements over the same batches (the train loader's first ``--steps`` batches):

1. ``trainer.fit`` with ``max_steps``: time per training batch (Lightning's hooks from
   ``on_train_batch_start`` to ``on_train_batch_end``: forward, backward, optimizer, logging
   and metrics), first ``--warmup`` batches left out, split by wrapping the module's methods
   (``training_step`` and inside it the log-prob passes, the loss, torchmetrics and
   ``self.log``; ``backward``; ``on_before_optimizer_step``; ``optimizer_step``);
2. the same work by hand, part by part: reference forward (``no_grad``), policy decoder forward,
   LM-head log-probs forward (chunked path: :class:`ChunkedTargetLogProbs`), loss, backward
   (the head's own backward timed inside it), AdamW step. What (1) spends beyond (2) is the
   Lightning loop, logging, torchmetrics and the module's per-step checks;
3. with ``--torch-profile``, the top operators of (1) by self CPU time; with ``--cprofile``,
   the top Python functions;
4. with ``--matmul-shapes``, each matrix product of a step timed alone at its own shape (the
   decoder's linears over the batch's positions, forward and both backward products, and the
   LM head's at the completion positions) against the 1024^3 matmul that
   ``throughput.py``'s model FLOP utilisation divides by: how close the products alone could
   come to it.

Times are this process's CPU time (``time.process_time``), not wall time: on a machine shared
with other work, time spent waiting for a core is left out (cache and memory-bandwidth
contention are not).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402

#: CPU time of this process: on a shared machine, time spent waiting for a core is not counted
CLOCK = time.process_time


def build(folder: Path, setting: throughput.Setting, args: argparse.Namespace):
    import lightning as L
    import torch

    from dpo_lightning.data import PreferenceDataModule
    from dpo_lightning.losses import DPOLoss
    from dpo_lightning.models import ModelSpec
    from dpo_lightning.modules import PreferenceModule

    L.seed_everything(0, verbose=False)
    module = PreferenceModule(
        model=ModelSpec(name_or_path=str(folder / "model"), tokenizer=str(folder / "tokenizer")), loss=DPOLoss(beta=0.1),
        optimizer=lambda params: torch.optim.AdamW(params, lr=throughput.LR),
        share_prompt={"true": True, "false": False}.get(args.share_prompt, args.share_prompt),
        logprobs=args.logprobs,
    )
    data = PreferenceDataModule(train_data=str(folder / "pairs.jsonl"), max_length=setting.max_length, batch_size=throughput.BATCH)
    data.connect(module.tokenizer, module.data_requirements)
    return module, data


def wrap(obj, name: str, label: str, totals: dict[str, float]) -> None:
    """Replace ``obj.name`` by a version that adds its CPU time to ``totals[label]``."""
    inner = getattr(obj, name)

    def timed(*a, **k):
        start = CLOCK()
        try:
            return inner(*a, **k)
        finally:
            totals[label] += CLOCK() - start

    setattr(obj, name, timed)


class Timers:
    """CPU-time totals by name (on the CPU every op has finished when it returns)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)

    def wrap_head(self) -> None:
        from dpo_lightning.modules import logprobs

        fn = logprobs.ChunkedTargetLogProbs
        forward, backward = fn.forward, fn.backward

        def timed(name, inner):
            def run(ctx, *a):
                start = CLOCK()
                try:
                    return inner(ctx, *a)
                finally:
                    self.total[name] += CLOCK() - start
            return staticmethod(run)

        fn.forward, fn.backward = timed("head forward", forward), timed("head backward", backward)
        for name in ("pack_shared_prompt", "shared_prompt_mask"):
            inner = getattr(logprobs, name)

            def run(*a, _inner=inner, _name=name, **k):
                start = CLOCK()
                try:
                    return _inner(*a, **k)
                finally:
                    self.total["shared layout (pack + mask)"] += CLOCK() - start
            setattr(logprobs, name, run)


def by_hand(module, batches, timers: Timers, warmup: int) -> dict[str, float]:
    import torch

    policy = module.policy
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=throughput.LR)
    parts: dict[str, list[float]] = defaultdict(list)
    for i, batch in enumerate(batches):
        timers.total.clear()
        t0 = CLOCK()
        reference = module.reference.logprobs(policy, batch, module.logprobs)
        t1 = CLOCK()
        head_ref = timers.total["head forward"]
        logps = module.logprobs(policy, batch)
        t2 = CLOCK()
        out = module.loss(logps, reference, batch)
        t3 = CLOCK()
        out.loss.backward()
        t4 = CLOCK()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t5 = CLOCK()
        if i < warmup:
            continue
        head_policy = timers.total["head forward"] - head_ref
        parts["  shared layout: pack + mask (both passes)"].append(timers.total["shared layout (pack + mask)"])
        parts["reference forward (no_grad)"].append(t1 - t0)
        parts["  of which LM head log-probs"].append(head_ref)
        parts["policy decoder forward"].append(t2 - t1 - head_policy)
        parts["policy LM head log-probs forward"].append(head_policy)
        parts["loss"].append(t3 - t2)
        parts["backward (decoder + embedding)"].append(t4 - t3 - timers.total["head backward"])
        parts["backward of LM head (recompute)"].append(timers.total["head backward"])
        parts["AdamW step + zero_grad"].append(t5 - t4)
    return {k: statistics.median(v) for k, v in parts.items()}


def print_matmul_shapes(setting: throughput.Setting, tokens: int, scored: int) -> None:
    """GFLOP/s of the step's matrix products at their shapes (one thread, best of 3), and what
    share of the 1024^3 matmul's rate they reach, weighted by their FLOPs in a training step.

    Args:
        tokens: positions the decoder runs per batch (padded).
        scored: positions the LM head scores per batch (completion tokens).
    """
    import torch

    hidden, inner, layers = throughput.ARCH["hidden_size"], throughput.ARCH["intermediate_size"], throughput.ARCH["num_hidden_layers"]

    def rate(m: int, k: int, n: int) -> float:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(3))
        return 2 * m * k * n / best

    peak = throughput.matmul_flops()
    # (name, m, k, n, times per step): forward, then backward's input and weight gradients;
    # policy forward + backward and reference forward
    linears = [("q/k/v/o", hidden, hidden, 4 * layers), ("gate/up", hidden, inner, 2 * layers), ("down", inner, hidden, layers)]
    rows = []
    for name, k, n, count in linears:
        rows += [(f"{name} forward", tokens, k, n, 2 * count), (f"{name} grad input", tokens, n, k, count),
                 (f"{name} grad weight", n, tokens, k, count)]
    rows += [("LM head forward (+ recompute)", scored, hidden, setting.vocab, 3), ("LM head grad input", scored, setting.vocab, hidden, 1),
             ("LM head grad weight", setting.vocab, scored, hidden, 1)]
    print(f"\nmatrix products of one step at their shapes (decoder {tokens} positions, LM head {scored}); "
          f"1024^3 matmul: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'product':<32}{'m x k x n':>22}{'GFLOP/s':>10}{'of 1024^3':>11}")
    flops = seconds = 0.0
    for name, m, k, n, count in rows:
        r = rate(m, k, n)
        flops += 2 * m * k * n * count
        seconds += 2 * m * k * n * count / r
        print(f"{name:<32}{f'{m} x {k} x {n}':>22}{r / 1e9:>10.1f}{r / peak:>11.0%}")
    print(f"{'all, weighted by FLOPs per step':<54}{flops / seconds / 1e9:>10.1f}{flops / seconds / peak:>11.0%}")


def _timed(fn) -> float:
    start = time.perf_counter()
    for _ in range(5):
        fn()
    return (time.perf_counter() - start) / 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="small", choices=list(throughput.SETTINGS))
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--share-prompt", default="auto", choices=["auto", "true", "false"])
    parser.add_argument("--logprobs", default="auto", choices=["auto", "chunked", "full"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--torch-profile", action="store_true")
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--matmul-shapes", action="store_true",
                        help="also time the step's matrix products at their own shapes against the 1024^3 matmul")
    args = parser.parse_args()

    import lightning as L
    import torch

    torch.set_num_threads(args.threads)
    setting = throughput.SETTINGS[args.setting]
    folder = Path(tempfile.mkdtemp(prefix="dpo-profile-"))
    throughput.make_inputs(folder, setting, args.pairs)

    # 1. Lightning, per batch
    module, data = build(folder, setting, args)
    step_times: list[float] = []
    fit_parts: dict[str, list[float]] = defaultdict(list)
    totals: dict[str, float] = defaultdict(float)
    for name, label in (("training_step", "training_step"), ("logprobs", "  log-prob passes (policy, reference)"),
                        ("log", "  self.log calls"), ("backward", "backward"),
                        ("on_before_optimizer_step", "on_before_optimizer_step (grad norm, finite check)"),
                        ("optimizer_step", "optimizer_step")):
        wrap(module, name, label, totals)
    wrap(module.loss, "forward", "  loss", totals)
    wrap(module.train_metrics, "update", "  torchmetrics update", totals)

    class StepClock(L.Callback):
        def on_train_batch_start(self, *_):
            totals.clear()
            self.start = CLOCK()

        def on_train_batch_end(self, *_):
            step_times.append(CLOCK() - self.start)
            for k, v in totals.items():
                fit_parts[k].append(v)

    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[StepClock()],
    )
    profiler = None
    if args.torch_profile:
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        profiler.__enter__()
    if args.cprofile:
        import cProfile

        cprof = cProfile.Profile()
        cprof.enable()
    start = CLOCK()
    trainer.fit(module, data)
    fit_seconds = CLOCK() - start
    if args.cprofile:
        cprof.disable()
    if profiler is not None:
        profiler.__exit__(None, None, None)
    lightning_step = statistics.median(step_times[args.warmup:])
    fit_median = {k: statistics.median(v[args.warmup:]) for k, v in fit_parts.items()}
    inner = ("training_step", "backward", "on_before_optimizer_step (grad norm, finite check)")
    fit_median["  AdamW (optimizer_step less the above)"] = fit_median["optimizer_step"] - sum(fit_median[k] for k in inner)

    # 2. the same batches by hand, on a fresh module (same initial weights); the data module sees
    # the CPU trainer, so it groups rows by the width they run at, as in (1)
    module, data = build(folder, setting, args)
    data.trainer = trainer
    data.setup("fit")
    batches = [b for _, b in zip(range(args.steps), data.train_dataloader())]
    timers = Timers()
    timers.wrap_head()
    parts = by_hand(module, batches, timers, args.warmup)
    core = sum(v for k, v in parts.items() if not k.startswith(" "))

    widths = [int(b["attention_mask"].shape[1]) for b in batches]
    print(f"{args.setting}: vocab {setting.vocab}, {args.pairs} pairs, batch {throughput.BATCH}, {args.steps} steps "
          f"(median over steps {args.warmup + 1}-{args.steps}), {args.threads} thread(s), logprobs {args.logprobs}, "
          f"share_prompt {args.share_prompt}; padded width median {statistics.median(widths):.0f}")
    print(f"trainer.fit total {fit_seconds:.2f} CPU s for {args.steps} steps (setup included)\n")
    print(f"{'trainer.fit, per step (median CPU ms)':<52}{'ms':>9}{'share':>8}")
    for name in ("training_step", "  log-prob passes (policy, reference)", "  loss", "  torchmetrics update",
                 "  self.log calls", "backward", "on_before_optimizer_step (grad norm, finite check)",
                 "optimizer_step", "  AdamW (optimizer_step less the above)"):
        print(f"{name:<52}{fit_median[name] * 1e3:>9.1f}{fit_median[name] / lightning_step:>8.0%}")
    print(f"{'Lightning loop and hooks outside optimizer_step':<52}{(lightning_step - fit_median['optimizer_step']) * 1e3:>9.1f}"
          f"{(lightning_step - fit_median['optimizer_step']) / lightning_step:>8.0%}")
    print(f"{'whole step':<52}{lightning_step * 1e3:>9.1f}\n")
    print(f"{'by hand, per step (median CPU ms)':<40}{'ms':>9}{'share':>8}")
    for name, value in parts.items():
        print(f"{name:<40}{value * 1e3:>9.1f}{value / lightning_step:>8.0%}")
    print(f"{'sum of the parts by hand':<40}{core * 1e3:>9.1f}{core / lightning_step:>8.0%}")
    print(f"{'Lightning step (fit, per batch)':<40}{lightning_step * 1e3:>9.1f}{1:>8.0%}")
    print(f"{'  beyond the parts: loop, logging, metrics':<40}{(lightning_step - core) * 1e3:>9.1f}"
          f"{(lightning_step - core) / lightning_step:>8.0%}")
    if profiler is not None:
        print("\n" + profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if args.matmul_shapes:
        from dpo_lightning.modules.logprobs import pack_shared_prompt

        # positions the decoder runs: the packed [prompt; chosen; rejected] rows where the prompt is shared
        tokens = statistics.median(
            pack_shared_prompt(b)["ids"].numel() if module.logprob_selector.shares_prompt(module.policy, b)
            else b["input_ids"].numel() for b in batches
        )
        scored = int(statistics.median(int(b["completion_mask"][:, 1:].sum()) for b in batches))
        print_matmul_shapes(setting, int(tokens), scored)
    if args.cprofile:
        import pstats

        pstats.Stats(cprof).sort_stats("tottime").print_stats(30)
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

"""The model card written beside an export (``README.md``): what was trained, on what, how well."""

from __future__ import annotations

import json
from typing import Any

import torch


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def model_card(module: Any, recipe: str | None = None) -> str:
    """Markdown for a trained module's export folder.

    Reads, where present: ``module.model_spec`` (base model), ``module.loss`` (class and plain
    hyperparameters), ``module.validation_history`` (the last validation's metrics), the
    trainer's data module (``data_fingerprint`` and the per-split ``reports``) and ``recipe``
    (the resolved YAML of the run).
    """
    spec = getattr(module, "model_spec", None)
    base = getattr(spec, "name_or_path", None) or "built from a config (`model.config`)"
    lines = ["---", "library_name: transformers", "tags: [dpo-lightning, preference-optimization]", "---", "",
             f"# {type(module.trained_model()).__name__} trained with dpo-lightning", "",
             f"* **Base model:** `{base}`"]
    loss = getattr(module, "loss", None)
    if loss is not None:
        settings = {k: _plain(v) for k, v in vars(loss).items() if not k.startswith("_") and k != "training"}
        lines.append(f"* **Objective:** `{type(loss).__name__}` {json.dumps(settings, default=str)}")
    lines.append(f"* **Training module:** `{type(module).__name__}`, {module.global_step} optimizer steps")
    datamodule = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
    if datamodule is not None:
        lines.append(f"* **Data:** `{getattr(datamodule, 'train_data', '?')}` (tokenized-data fingerprint "
                     f"`{getattr(datamodule, 'data_fingerprint', None)}`)")
        for split, report in getattr(datamodule, "reports", {}).items():
            dropped = ", ".join(f"{k} {v}" for k, v in report.dropped.items()) or "none"
            lines.append(f"  * {split}: {report.rows_read} rows read, {report.rows_kept} kept, dropped: {dropped}")
    history = [h for h in getattr(module, "validation_history", []) if not h.get("sanity_check")]
    if history:
        lines += ["", f"## Validation (step {history[-1]['step']})", "", "| metric | value |", "|---|---|"]
        lines += [f"| `val/{k}` | {v:.6g} |" for k, v in history[-1].items()
                  if k not in ("step", "sanity_check") and isinstance(v, float)]
    if recipe:
        lines += ["", "## Recipe", "", "```yaml", recipe.rstrip(), "```"]
    return "\n".join(lines) + "\n"

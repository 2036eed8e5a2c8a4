"""The model card written beside an export (``README.md``): what was trained, on what, how well."""

from __future__ import annotations

import json
from typing import Any, Protocol

import torch

from .models import ModelSpec


class CardModule(Protocol):
    """What the card reads from the training module (all public)."""

    model_spec: ModelSpec | None
    validation_history: list[dict[str, Any]]

    @property
    def global_step(self) -> int: ...

    def trained_model(self) -> torch.nn.Module: ...

    def objective(self) -> torch.nn.Module | None: ...


class CardData(Protocol):
    """What the card reads from the data module (all public)."""

    train_data: Any
    data_fingerprint: str | None
    reports: dict[str, Any]


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def model_card(module: CardModule, datamodule: CardData | None = None, recipe: str | None = None) -> str:
    """Markdown for a trained module's export folder.

    Names the base model (``module.model_spec``), the objective (``module.objective()``: class
    and plain hyperparameters), the training module and its steps, the data (``datamodule``'s
    ``train_data``, ``data_fingerprint`` and per-split ``reports``), the last validation's
    metrics (``module.validation_history``) and ``recipe`` (the resolved YAML of the run).
    """
    spec = module.model_spec
    base = (spec.name_or_path if spec is not None else None) or "built from a config (`model.config`)"
    lines = ["---", "library_name: transformers", "tags: [dpo-lightning, preference-optimization]", "---", "",
             f"# {type(module.trained_model()).__name__} trained with dpo-lightning", "",
             f"* **Base model:** `{base}`"]
    loss = module.objective()
    if loss is not None:
        settings = {k: _plain(v) for k, v in vars(loss).items() if not k.startswith("_") and k != "training"}
        lines.append(f"* **Objective:** `{type(loss).__name__}` {json.dumps(settings, default=str)}")
    lines.append(f"* **Training module:** `{type(module).__name__}`, {module.global_step} optimizer steps")
    if datamodule is not None:
        lines.append(f"* **Data:** `{datamodule.train_data}` (tokenized-data fingerprint "
                     f"`{datamodule.data_fingerprint}`)")
        for split, report in datamodule.reports.items():
            dropped = ", ".join(f"{k} {v}" for k, v in report.dropped.items()) or "none"
            lines.append(f"  * {split}: {report.rows_read} rows read, {report.rows_kept} kept, dropped: {dropped}")
    history = [h for h in module.validation_history if not h.get("sanity_check")]
    if history:
        lines += ["", f"## Validation (step {history[-1]['step']})", "", "| metric | value |", "|---|---|"]
        lines += [f"| `val/{k}` | {v:.6g} |" for k, v in history[-1].items()
                  if k not in ("step", "sanity_check") and isinstance(v, float)]
    if recipe:
        lines += ["", "## Recipe", "", "```yaml", recipe.rstrip(), "```"]
    return "\n".join(lines) + "\n"

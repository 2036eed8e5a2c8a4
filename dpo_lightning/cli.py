"""``dpo-lightning``: the LightningCLI entry point (``fit``, ``validate``, ``--print_config``)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
import yaml

from . import data, losses, modules  # noqa: F401 - imported so short class names resolve (--model.help PreferenceModule)
from .checkpoints import check_checkpoint_file, find_resumable_checkpoint
from .console import USER_ERRORS, closest, debug_requested, error_text, verbose_libraries
from .export import REFERENCE_RECORD, read_reference_record
from .lora import LoraSpec
from .models import ModelSpec
from .modules import AlignmentModule, PreferenceModule
from .modules.reference import MOVED_SETTINGS, moved_setting_message

#: model specs in a recipe that a command-line ``name_or_path`` may switch to a pretrained model
SPEC_KEYS = ("model.init_args.model", "model.init_args.reference.model")
#: where a recipe's reference settings live (:class:`~dpo_lightning.modules.ReferenceSpec`)
REFERENCE_KEY = "model.init_args.reference"


def connect(model: L.LightningModule, datamodule: L.LightningDataModule | None) -> None:
    """``datamodule.connect(model.tokenizer, model.data_requirements)`` when both sides speak the
    contract (:mod:`dpo_lightning.contract`); a user's own classes that do not are left alone."""
    if datamodule is not None and hasattr(datamodule, "connect") and hasattr(type(model), "data_requirements"):
        datamodule.connect(model.tokenizer, model.data_requirements)


#: jsonargparse parser mode of the CLI: YAML that refuses a key written twice in one mapping
PARSER_MODE = "yaml_unique_keys"


def _yaml_unique_keys(text: str):
    """jsonargparse's YAML loader, after a pass that refuses a key written twice in one mapping
    (plain YAML keeps the last silently: a recipe's second ``lr:`` would win unseen)."""
    from jsonargparse import get_loader

    class Checker(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):  # type: ignore[override]
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise ValueError(
                        f"recipe key {key!r} is written twice in one mapping (lines {seen[key]} and "
                        f"{key_node.start_mark.line + 1}); keep one"
                    )
                seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep)

    if isinstance(text, str) and ":" in text:
        yaml.load(text, Loader=Checker)
    return get_loader("yaml")(text)


def switch_to_pretrained(config, command_line: list[str]) -> None:
    """A ``name_or_path`` given on the command line replaces a recipe's from-scratch model.

    ``--model.init_args.model.name_or_path org/name`` on a recipe that builds its model from
    ``config:`` drops that ``config`` and the recipe's ``tokenizer`` (it belonged to the model
    built from scratch; the pretrained model brings its own), unless the command line sets them
    too. The same for ``reference.model``.
    """
    given = {a[2:].split("=", 1)[0] for a in command_line if a.startswith("--")}
    for key in SPEC_KEYS:
        spec = config.get(key) if f"{key}.name_or_path" in given else None
        if spec is None or spec.get("config") is None or spec.get("name_or_path") is None:
            continue
        spec["config"] = None
        if f"{key}.tokenizer" not in given:
            spec["tokenizer"] = None
        rank_zero_info(f"{key}.name_or_path from the command line: the recipe's from-scratch `config` is not used")


def use_recorded_reference(config) -> None:
    """``validate`` of an exported policy: with no ``reference.model`` in the recipe or on the
    command line, the reference recorded beside the policy (``reference.json``, written at
    export) is the one it is measured against (``reference.model``; the section's other
    settings are kept)."""
    if REFERENCE_KEY not in config:  # a module without a reference (SFT, reward model)
        return
    section = config.get(REFERENCE_KEY)
    if section is not None and section.get("model") is not None:
        return
    folder = config.get("model.init_args.model.name_or_path")
    recorded = read_reference_record(folder) if folder else None
    if recorded is not None:
        if section is None:
            config[REFERENCE_KEY] = {"model": dataclasses.asdict(recorded)}
        else:
            config[f"{REFERENCE_KEY}.model"] = dataclasses.asdict(recorded)
        rank_zero_info(f"reference: {recorded.name_or_path or 'the from-config model'}, as recorded in "
                       f"{Path(folder) / REFERENCE_RECORD}")


class DPOLightningCLI(LightningCLI):
    """LightningCLI with the model and data chosen by ``class_path`` in the recipe.

    After building both, it connects them in one call,
    ``datamodule.connect(model.tokenizer, model.data_requirements)``: the data module gets the
    model's tokenizer and the loss's batch layout and columns, so a recipe names each once. After ``fit`` it prints the held-out reward accuracy
    before and after training (``val/rewards/accuracy: A -> B``) when the recipe validated
    before the first step (``trainer.num_sanity_val_steps: -1``).
    """

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Every parser (the main one and each subcommand's) takes an option only by its whole
        name: argparse would read ``--trainer.max_epoch 2`` as ``--trainer.max_epochs 2``
        without a word, and a misspelled key would silently set another one."""
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` loads (safely), but keep the recipe's values.

        LightningCLI would overwrite the recipe with the checkpoint's saved hyperparameters;
        here the recipe stays authoritative and the module compares the run's fingerprints
        with the checkpoint's, failing with what differs.
        """
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            check_checkpoint_file(ckpt_path)

    def parse_arguments(self, parser, args) -> None:
        self.command_line = [str(a) for a in (sys.argv[1:] if args is None else args)] if not isinstance(args, dict) else []
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as err:
            # the options the subcommand accepts, for "did you mean" (summarize_parse_error)
            subcommands = getattr(parser, "_subcommands_action", None)
            command = next((a for a in self.command_line if not a.startswith("-")), None)
            sub = subcommands._name_parser_map.get(command) if subcommands and command else parser
            err.accepted_options = [s for action in getattr(sub, "_actions", []) for s in action.option_strings]  # type: ignore[attr-defined]
            raise

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.config.get("subcommand") or "", self.config)
        switch_to_pretrained(config, self.command_line)
        if self.config.get("subcommand") == "validate":
            use_recorded_reference(config)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        connect(self.model, self.datamodule)

    def resolve_checkpoint(self) -> None:
        """``--ckpt_path last``: the newest readable checkpoint of this run, wherever the logger
        put it (every ``version_N`` folder), or an error saying where it looked. Lightning alone
        looks only in the new run's folder and trains from scratch when it finds nothing.
        Checkpoints are always read with ``weights_only=True``."""
        kwargs = self.config_init[self.subcommand]
        if "weights_only" in kwargs:
            kwargs["weights_only"] = True
        if kwargs.get("ckpt_path") != "last":
            return
        roots = [self.trainer.default_root_dir]
        roots += [cb.dirpath for cb in self.trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
        roots += [getattr(logger, "save_dir", None) for logger in self.trainer.loggers]
        path = find_resumable_checkpoint(r for r in roots if r)
        rank_zero_info(f"--ckpt_path last: resuming from {path}")
        kwargs["ckpt_path"] = str(path)

    def before_fit(self) -> None:
        self.resolve_checkpoint()
        if isinstance(self.model, AlignmentModule):  # for the model card
            self.model.record_recipe(self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False))
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.model.parameters() if not p.requires_grad)
        parts = ", ".join(f"{name} {type(child).__name__}" for name, child in self.model.named_children()
                          if any(True for _ in child.parameters()))
        rank_zero_info(f"model: {trainable:,} trainable and {frozen:,} frozen parameters ({parts})")

    def before_validate(self) -> None:
        self.resolve_checkpoint()
        if isinstance(self.model, PreferenceModule):
            self.model.check_reference_is_not_the_policy(self.config_init[self.subcommand].get("ckpt_path"))

    def after_fit(self) -> None:
        """Print the module's :meth:`~.modules.AlignmentModule.summary_metrics` of the last
        validation, after the pre-training figures when the sanity check covered the whole
        validation set (``label: before -> after``)."""
        if not isinstance(self.model, AlignmentModule):
            return
        history = self.model.validation_history
        if history and (history[-1]["sanity_check"] or history[-1]["step"] < self.trainer.global_step):
            # the run validated, but not after its last step (max_steps inside an epoch):
            # validate now, so the summary and the logs end on the trained policy
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        if not history or self.trainer.global_rank != 0:
            return
        # a "before" figure only when the pre-training check covered the whole validation set
        whole = self.trainer.num_sanity_val_steps >= sum(self.trainer.num_val_batches or [float("inf")])
        before = history[0] if history[0]["sanity_check"] and whole and len(history) > 1 else None
        for key, label in self.model.summary_metrics().items():
            if key not in history[-1]:
                continue
            after = f"{history[-1][key]:.2f}"
            print(f"{label}: {before[key]:.2f} -> {after}" if before and key in before else f"{label}: {after}")


def run(args: list[str] | None = None, exit_on_error: bool = True) -> DPOLightningCLI:
    """Run the CLI and return it; ``args`` replaces ``sys.argv[1:]`` (tests, notebooks).
    ``exit_on_error=False`` raises a parse error (``argparse.ArgumentError``) instead of
    printing the usage and exiting."""
    from jsonargparse import set_loader

    set_loader(PARSER_MODE, _yaml_unique_keys, exceptions=(yaml.YAMLError,))
    return DPOLightningCLI(
        parser_kwargs={"parser_mode": PARSER_MODE, "exit_on_error": exit_on_error},
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"enable_model_summary": False},  # one line instead (before_fit)
        args=args,
    )


def innermost_reasons(message: str) -> str:
    """The reasons inside jsonargparse's nested "Does not validate against any of the Union
    subtypes" report (a class's own error raised while it was built), joined on one line;
    ``message`` itself when it is no such report."""
    if "Does not validate against any of the Union subtypes" not in message:
        return message
    skip = ("Does not validate", "Expected a <class 'NoneType'>", "Given value", "Subtypes", "Errors:")
    reasons = [line.strip()[2:] for line in message.splitlines() if line.strip().startswith("- ")]
    kept = [r for r in reasons if not r.startswith(skip)]
    return "; ".join(dict.fromkeys(kept)) or message


def moved_reference_setting(message: str) -> str | None:
    """The error for a flat reference setting of earlier releases (``precompute_reference``,
    ``reference_update``, ...) that a jsonargparse error reports as not accepted, from a recipe
    or the command line: where it lives now, in the ``reference`` section, with the value the
    user gave written there when the report shows it; ``None`` for any other error."""
    names = "|".join(MOVED_SETTINGS)
    cause = re.search(rf"(?:Option '|unrecognized arguments: --)({names})\b", message)
    if cause is None:
        return None
    name = cause.group(1)
    given = re.search(r"Given value: (.*)", message)
    value = None
    try:
        text = given.group(1).strip() if given else ""
        nested = re.fullmatch(r"NestedArg\(key='([^']*)', val='(.*)'\)", text)
        if nested:  # --model.init_args.<key>[.<field>] <val> on the command line
            first, *fields = nested.group(1).split(".")
            value = yaml.safe_load(nested.group(2)) if first == name else None
            for field in reversed(fields if value is not None else []):
                value = {field: value}
        elif text:
            value = ast.literal_eval(text).get("init_args", {}).get(name)
    except (ValueError, SyntaxError, AttributeError, yaml.YAMLError):
        value = None
    return moved_setting_message(name) if value is None else moved_setting_message(name, value)


def summarize_parse_error(message: str, accepted_options: Sequence[str] = ()) -> str:
    """One line from a jsonargparse error: the recipe key and the innermost reasons (an import
    error first), with the closest accepted option or argument when one was misspelled; a flat
    reference setting of earlier releases is pointed to the ``reference`` section."""
    moved = moved_reference_setting(message)
    if moved is not None:
        return moved
    keys = re.findall(r'Parser key "([^"]+)"', message)
    key = ".init_args.".join(keys) if keys else "the recipe"
    missing = re.search(r"No module named '[^']+'", message)
    if missing:
        problems = re.findall(r"Problem with given class_path '([^']+)'", message)
        named = f"{problems[-1]!r}: " if problems else ""
        return f"{key}: {named}{missing.group(0)} (is the module on PYTHONPATH?)"
    # a class's own parser reports its options relative to it (--los.init_args.beta under "model")
    within = "--" + "".join(f"{k}.init_args." for k in keys)
    unrecognized = re.search(r"unrecognized arguments: (.*)", message)
    if unrecognized:
        tokens = [within + t[2:] if t.startswith("--") else t for t in unrecognized.group(1).split()]
        return f"unrecognized arguments: {' '.join(tokens)}" + did_you_mean_options(tokens, accepted_options)
    deepest = message.rsplit('Parser key "', 1)[-1]
    first, *rest = deepest.splitlines() or [""]
    inline = first.split('":', 1)[1].strip() if '":' in first else ("" if keys else first.strip())
    skip = ("Does not validate", "Subtypes", "Errors:", "Given value type", "Expected a <class 'NoneType'>")
    reasons = [line.strip(" -") for line in ([inline] if inline else []) + rest
               if line.strip() and not line.strip(" -").startswith(skip)]
    given = next((r for r in reasons if r.startswith("Given value:")), None)
    reasons = [r for r in reasons if not r.startswith(("Given value", "Problem with given", "Parser key"))]
    summary = f"{key}: " + "; ".join(dict.fromkeys(reasons)) + (f" ({given})" if given else "")
    in_group = re.search(r"Group '([^']+)' does not accept option '([^']+)'", message)
    if in_group and (near := corrected_option(f"{within}{in_group.group(1)}.{in_group.group(2)}", accepted_options)):
        summary += f"; did you mean {near}?"
    if "File does not exist" in message:
        summary += f" (relative paths resolve against the working directory, {os.getcwd()})"
    not_accepted = re.search(r"Option '([^']+)' is not accepted", message)
    if not_accepted and (near := corrected_option(within + not_accepted.group(1), accepted_options)):
        summary += f"; did you mean {near}?"
    if re.search(r"Option 'divergence(_alpha)?' is not accepted", message):
        summary += (
            "; f-divergences apply only to losses built on the chosen-minus-rejected log-ratio difference: "
            + ", ".join(divergence_losses())
        )
    return summary


def did_you_mean_options(tokens: Sequence[str], accepted_options: Sequence[str]) -> str:
    """``"; did you mean --trainer.max_steps?"`` for the misspelled ``--options`` among ``tokens``
    (see :func:`corrected_option`)."""
    hints = [near for token in tokens if token.startswith("--")
             if (near := corrected_option(token.split("=", 1)[0], accepted_options)) is not None]
    return f"; did you mean {', '.join(hints)}?" if hints else ""


def corrected_option(option: str, accepted_options: Sequence[str]) -> str | None:
    """The whole option a user most likely meant by a misspelled ``option``, part by part: the
    first part among the parser's sections (``--modle.*`` -> ``--model.*``), each later part among
    the options the parser knows under the corrected prefix and the argument names of the
    library's classes (``--trainer.max_stepz`` -> ``--trainer.max_steps``,
    ``--model.init_args.los.init_args.beta`` -> ``--model.init_args.loss.init_args.beta``);
    ``None`` when a part is near nothing or nothing changes."""
    accepted = [o[2:].split(".") for o in accepted_options if o.startswith("--")]
    structure = {"init_args", "class_path", "dict_kwargs"}
    fixed: list[str] = []
    for depth, part in enumerate(option[2:].split(".")):
        known = {o[depth] for o in accepted if len(o) > depth and o[:depth] == fixed}
        if depth > 0 or not known:
            known |= init_arg_names() | structure
        word = part if part in known else closest(part, known)
        if word is None:
            return None
        if not (word == "init_args" and fixed[-1:] == ["init_args"]):  # init_arg.loss under init_args
            fixed.append(word)
    corrected = "--" + ".".join(fixed)
    return corrected if corrected != option else None


@functools.cache
def init_arg_names() -> frozenset[str]:
    """Every argument name that the library's modules, data modules, losses and their nested
    specs (dataclasses such as ``ModelSpec``) accept."""
    names: set[str] = set()
    seen: set[type] = set()

    def add(cls: type) -> None:
        if cls in seen or not cls.__module__.startswith("dpo_lightning"):
            return
        seen.add(cls)
        if dataclasses.is_dataclass(cls):
            names.update(f.name for f in dataclasses.fields(cls))
        for klass in cls.__mro__:
            if "__init__" in vars(klass) and klass.__module__.startswith("dpo_lightning"):
                params = inspect.signature(klass.__init__).parameters.values()
                names.update(p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))

    for package in (modules, data, losses):
        for name in getattr(package, "__all__", ()):
            if inspect.isclass(obj := getattr(package, name)):
                add(obj)
    for cls in (ModelSpec, LoraSpec):
        add(cls)
    return frozenset(names)


def divergence_losses() -> list[str]:
    """Names of the library's losses that accept ``divergence`` (f-DPO), sorted."""
    return sorted(
        name for name in losses.__all__
        if inspect.isclass(cls := getattr(losses, name)) and "divergence" in inspect.signature(cls.__init__).parameters
    )


def main() -> None:
    """Console-script entry point ``dpo-lightning``.

    A configuration, data or checkpoint error ends the run with its message as the last line
    (``error: ...``) and exit status 1; ``--debug`` or ``DPO_LIGHTNING_DEBUG=1`` shows the traceback.
    """
    debug = debug_requested(sys.argv[1:])
    if "--verbose" in sys.argv[1:] or debug:
        verbose_libraries()
    sys.argv[1:] = [a for a in sys.argv[1:] if a not in ("--debug", "--verbose")]
    try:
        run(exit_on_error=debug)
    except argparse.ArgumentError as err:
        summary = summarize_parse_error(str(err), getattr(err, "accepted_options", ()))
        print(f"error: {summary}  [--debug shows the whole report]", file=sys.stderr)
        sys.exit(2)
    except USER_ERRORS as err:
        if debug:
            raise
        message = " ".join(innermost_reasons(error_text(err)).split())  # the reasons are read line by line
        print(f"error: {message}  [--debug shows the traceback]", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

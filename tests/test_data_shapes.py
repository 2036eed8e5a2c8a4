"""The dataset shapes people bring, through the Python API and the CLI.

UltraFeedback-binarized rows, mixed kinds across rows, SFT ``messages``, column mapping, weighted
sources, hub arguments and split slicing, chat-template keyword arguments, in-memory data.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from conftest import TOKENIZER_DIR, quickstart_rows, tiny_recipe, write_jsonl, write_recipe
from dpo_lightning.cli import run
from dpo_lightning.data import PreferenceDataModule, SFTDataModule, UnpairedDataModule
from dpo_lightning.data.report import SourceCount
from tokenizer_kinds import shipped, thinking_template

QUESTION = "Review the kettle."
USER = {"role": "user", "content": QUESTION}
GOOD = {"role": "assistant", "content": "It is great."}
BAD = {"role": "assistant", "content": "It is poor."}


def chat_ids(tok, messages, generation_prompt, **kwargs) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)
    return tok(text, add_special_tokens=False)["input_ids"]


def set_up(module, data, tok=None, **kwargs):
    """A data module on ``data``, connected to ``tok`` (the shipped tokenizer) and set up."""
    dm = module(train_data=data, **kwargs)
    dm.connect(tok or shipped())
    dm.setup("fit")
    return dm


def ids(dm, i: int = 0, split: str = "train") -> tuple:
    row = dm.splits[split][i]
    return tuple(row[c] for c in ("prompt_ids", *[c for c in ("chosen_ids", "rejected_ids", "completion_ids") if c in row]))


def ultrafeedback(rows: list[dict]) -> list[dict]:
    """Quickstart pairs in the UltraFeedback-binarized shape: a string prompt, and chosen /
    rejected conversations that repeat the user turn."""
    out = []
    for r in rows:
        user = {"role": "user", "content": r["prompt"]}
        out.append({
            "prompt": r["prompt"],
            "chosen": [user, {"role": "assistant", "content": r["chosen"].strip()}],
            "rejected": [user, {"role": "assistant", "content": r["rejected"].strip()}],
            "score_chosen": 8.0, "score_rejected": 3.0,
        })
    return out


def fit(tmp_path: Path, recipe: dict):
    cli = run(["fit", "--config", write_recipe(tmp_path / "r.yaml", recipe)])
    return cli


# --- 1. UltraFeedback-binarized and the other mixes TRL accepts -----------------------------
def test_ultrafeedback_shape_prompt_is_the_shared_user_turn(tmp_path) -> None:
    tok = shipped()
    explicit = set_up(PreferenceDataModule, [{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}], tok)
    expected = ids(explicit)
    assert expected[0] == chat_ids(tok, [USER], True)
    shapes = {
        "ultrafeedback": {"prompt": QUESTION, "chosen": [USER, GOOD], "rejected": [USER, BAD]},
        "string prompt, assistant-only replies": {"prompt": QUESTION, "chosen": [GOOD], "rejected": [BAD]},
        "conversational prompt, string replies": {"prompt": [USER], "chosen": GOOD["content"], "rejected": BAD["content"]},
        "implicit prompt": {"chosen": [USER, GOOD], "rejected": [USER, BAD]},
    }
    for name, row in shapes.items():
        dm = set_up(PreferenceDataModule, write_jsonl(tmp_path / f"{len(name)}.jsonl", [row]), tok)
        assert ids(dm) == expected, name
        assert dm.reports["train"].rows_kept == 1, name


def test_ultrafeedback_row_that_cannot_be_one_kind_is_counted_as_wrong_type(tmp_path) -> None:
    other = {"role": "user", "content": "Something else."}
    rows = [
        {"prompt": QUESTION, "chosen": [USER, GOOD], "rejected": [USER, BAD]},
        {"prompt": QUESTION, "chosen": [other, GOOD], "rejected": [USER, BAD]},  # no shared turn, replies open with a user turn
        {"prompt": QUESTION, "chosen": [USER, GOOD], "rejected": [USER, BAD]},
    ]
    dm = set_up(PreferenceDataModule, write_jsonl(tmp_path / "u.jsonl", rows))
    assert dm.reports["train"].dropped == {"wrong_type": 1} and dm.reports["train"].examples == {"wrong_type": [1]}
    assert sorted(dm.train_dataset["row_id"]) == [0, 2]


def test_ultrafeedback_shape_for_kto_and_sft(tmp_path) -> None:
    tok = shipped()
    path = write_jsonl(tmp_path / "u.jsonl", [{"prompt": QUESTION, "chosen": [USER, GOOD], "rejected": [USER, BAD]}] * 2)
    kto = set_up(UnpairedDataModule, path, tok, batch_size=2)
    assert kto.train_dataset["label"] == [True, False, True, False]
    assert kto.train_dataset[0]["prompt_ids"] == chat_ids(tok, [USER], True)
    sft = set_up(SFTDataModule, [{"prompt": QUESTION, "completion": [GOOD]}], tok)
    assert ids(sft) == (chat_ids(tok, [USER], True), kto.train_dataset[0]["completion_ids"])


def test_ultrafeedback_shape_trains_from_the_cli(tmp_path) -> None:
    train = write_jsonl(tmp_path / "uf_train.jsonl", ultrafeedback(quickstart_rows(12)))
    val = write_jsonl(tmp_path / "uf_val.jsonl", ultrafeedback(quickstart_rows(4, "val")))
    cli = fit(tmp_path, tiny_recipe(tmp_path, train, val))
    assert cli.trainer.global_step == 2
    report = cli.datamodule.reports["train"]
    assert report.rows_read == 12 and report.rows_kept + sum(report.dropped.values()) == 12 and report.rows_kept >= 8
    tok = cli.model.tokenizer
    first = cli.datamodule.train_dataset.sort("row_id")[0]
    assert first["prompt_ids"] == chat_ids(tok, [{"role": "user", "content": quickstart_rows(1)[0]["prompt"]}], True)


# --- 2. one kind per dataset --------------------------------------------------------------
def test_rows_that_mix_strings_and_conversations_are_an_error(tmp_path) -> None:
    rows = [{"prompt": "p", "chosen": " a", "rejected": " b"}] * 3 + [{"prompt": QUESTION, "chosen": [GOOD], "rejected": [BAD]}]
    pattern = r"data.init_args.train_data: the rows mix plain strings \(first: row 0\) and conversations \(first: row 3\).*one kind"
    with pytest.raises(ValueError, match=pattern):
        set_up(PreferenceDataModule, write_jsonl(tmp_path / "m.jsonl", rows))
    with pytest.raises(ValueError, match=pattern):  # the same rows from Python
        set_up(PreferenceDataModule, rows)
    # two sources of different kinds: the rows are named in their sources
    a = write_jsonl(tmp_path / "a.jsonl", rows[:3])
    b = write_jsonl(tmp_path / "b.jsonl", rows[3:] * 2)
    with pytest.raises(ValueError, match=r"plain strings \(first: row 0 of data.init_args.train_data\[0\] \(.*a.jsonl\)\) "
                                         r"and conversations \(first: row 0 of data.init_args.train_data\[1\] \(.*b.jsonl\)\)"):
        set_up(PreferenceDataModule, [{"path": a}, {"path": b, "rows": 1}])


# --- 3. SFT on messages -------------------------------------------------------------------
def test_sft_messages_prompt_is_everything_before_the_last_assistant_turn(tmp_path) -> None:
    tok = shipped()
    system = {"role": "system", "content": "Be brief."}
    follow_up = {"role": "user", "content": "And the lid?"}
    lid = {"role": "assistant", "content": "It fits."}
    rows = [
        {"messages": [system, USER, GOOD]},
        {"messages": [USER, GOOD, follow_up, lid]},
        {"messages": [USER, GOOD, follow_up]},  # ends with a user turn: nothing to train on
    ]
    dm = set_up(SFTDataModule, write_jsonl(tmp_path / "m.jsonl", rows), tok)
    assert dm.reports["train"].dropped == {"no_final_assistant": 1} and dm.reports["train"].examples == {"no_final_assistant": [2]}
    for i, (prompt, reply) in enumerate([([system, USER], GOOD), ([USER, GOOD, follow_up], lid)]):
        prompt_ids, completion_ids = ids(dm, i)
        assert prompt_ids == chat_ids(tok, prompt, True)
        full = chat_ids(tok, prompt + [reply], False)
        assert full[: len(prompt_ids) + len(completion_ids)] == prompt_ids + completion_ids
        assert completion_ids[-1] == tok.eos_token_id and tok.decode(completion_ids, skip_special_tokens=True).strip() == reply["content"]


def test_sft_missing_column_message_is_about_sft(tmp_path) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "answer": " a"}])
    with pytest.raises(ValueError) as info:
        set_up(SFTDataModule, path)
    message = str(info.value)
    assert "column(s) ['prompt', 'completion'] missing" in message
    assert "SFTDataModule reads ['prompt', 'completion'], or one 'messages' column" in message
    assert "data.init_args.columns" in message and "scores" not in message


def test_sft_messages_trains_from_the_cli(tmp_path) -> None:
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"].strip()}]}
            for r in quickstart_rows(12)]
    recipe = tiny_recipe(tmp_path, write_jsonl(tmp_path / "m.jsonl", rows[:8]), write_jsonl(tmp_path / "mv.jsonl", rows[8:]))
    init = recipe["model"]["init_args"]
    recipe["model"] = {"class_path": "dpo_lightning.modules.SFTModule", "init_args": {
        k: init[k] for k in ("model", "optimizer", "export_dir")}}
    recipe["data"]["class_path"] = "dpo_lightning.data.SFTDataModule"
    cli = fit(tmp_path, recipe)
    assert cli.trainer.global_step == 2
    assert cli.datamodule.reports["train"].rows_kept == 8
    assert (tmp_path / "export" / "model.safetensors").exists()


# --- 4. column mapping ----------------------------------------------------------------------
def se_rows(n: int) -> list[dict]:
    """Quickstart pairs under StackExchange-style names."""
    return [{"question": r["prompt"], "response_j": r["chosen"], "response_k": r["rejected"], "qid": i}
            for i, r in enumerate(quickstart_rows(n))]


MAPPING = {"question": "prompt", "response_j": "chosen", "response_k": "rejected"}


def test_columns_mapping_gives_the_canonical_rows(tmp_path) -> None:
    tok = shipped()
    canonical = set_up(PreferenceDataModule, write_jsonl(tmp_path / "c.jsonl", quickstart_rows(5)), tok)
    mapped = set_up(PreferenceDataModule, write_jsonl(tmp_path / "se.jsonl", se_rows(5)), tok, columns=MAPPING)
    assert mapped.train_dataset["prompt_ids"] == canonical.train_dataset["prompt_ids"]
    assert mapped.train_dataset["chosen_ids"] == canonical.train_dataset["chosen_ids"]
    with pytest.raises(ValueError, match=r"data.init_args.columns: column\(s\) \['response_x'\] are not in "
                                         r"data.init_args.train_data .*'response_j'"):
        set_up(PreferenceDataModule, write_jsonl(tmp_path / "se.jsonl", se_rows(5)), tok,
               columns={**MAPPING, "response_x": "margin"})
    with pytest.raises(ValueError, match=r"data.init_args.columns: maps 'question' to 'prompt', but .* already has a 'prompt' column"):
        set_up(PreferenceDataModule, [{**r, "prompt": "x"} for r in se_rows(3)], tok, columns=MAPPING)


def test_columns_mapping_trains_from_the_cli(tmp_path) -> None:
    recipe = tiny_recipe(tmp_path, write_jsonl(tmp_path / "se.jsonl", se_rows(12)), write_jsonl(tmp_path / "sv.jsonl", se_rows(4)))
    recipe["data"]["init_args"]["columns"] = MAPPING
    cli = fit(tmp_path, recipe)
    assert cli.trainer.global_step == 2 and cli.datamodule.reports["train"].rows_kept == 12
    assert cli.datamodule.column_map == MAPPING


# --- 5. weighted sources --------------------------------------------------------------------
def two_sources(tmp_path) -> tuple[str, str]:
    rows = quickstart_rows(50)
    return write_jsonl(tmp_path / "a.jsonl", rows[:20]), write_jsonl(tmp_path / "b.jsonl", rows[20:])


def test_weighted_sources_are_sampled_with_the_seed_and_counted(tmp_path, caplog) -> None:
    a, b = two_sources(tmp_path)
    spec = [{"path": a, "fraction": 0.5}, {"path": b, "rows": 5}]
    first = set_up(PreferenceDataModule, spec, split_seed=1)
    report = first.reports["train"]
    assert report.sources == [SourceCount(a, 20, 10), SourceCount(b, 30, 5)]
    assert report.rows_read == 15 and report.as_dict()["data/train/source1/rows"] == 5
    assert f"source 0:     10 of 20 rows from {a}" in caplog.text
    again = set_up(PreferenceDataModule, spec, split_seed=1)
    other = set_up(PreferenceDataModule, spec, split_seed=2)
    assert again.train_dataset["prompt_ids"] == first.train_dataset["prompt_ids"]
    assert other.train_dataset["prompt_ids"] != first.train_dataset["prompt_ids"]
    # rows [0, 10) come from a.jsonl, in their order there
    a_prompts = [r["prompt"] for r in quickstart_rows(20)]
    picked = [shipped().decode(p, skip_special_tokens=True) for p in first.train_dataset.sort("row_id")["prompt_ids"][:10]]
    assert all(p in a_prompts for p in picked) and sorted(picked, key=a_prompts.index) == picked
    # sources with their own column names, a plain path among them, max_rows per source
    se = write_jsonl(tmp_path / "se.jsonl", se_rows(6))
    mixed = set_up(PreferenceDataModule, [a, {"path": se, "columns": MAPPING}], max_rows=4)
    assert mixed.reports["train"].sources == [SourceCount(a, 20, 4), SourceCount(se, 6, 4)]


def test_weighted_sources_bad_settings_name_the_entry(tmp_path) -> None:
    a, b = two_sources(tmp_path)
    cases = {
        r"train_data\[1\]: unknown key\(s\) \['fractoin'\]": [{"path": a}, {"path": b, "fractoin": 0.5}],
        r"train_data\[0\].fraction must be in \(0, 1\], got 1.5": [{"path": a, "fraction": 1.5}],
        r"train_data\[0\]: set fraction or rows, not both": [{"path": a, "fraction": 0.5, "rows": 3}],
        r"train_data\[0\].rows must be an integer >= 1": [{"path": a, "rows": 0}],
    }
    for pattern, spec in cases.items():
        with pytest.raises(ValueError, match=pattern):
            PreferenceDataModule(train_data=spec)
    with pytest.raises(ValueError, match=r"train_data\[1\].rows asks for 40 rows but .*b.jsonl has 30; lower rows"):
        set_up(PreferenceDataModule, [{"path": a}, {"path": b, "rows": 40}])
    other = write_jsonl(tmp_path / "o.jsonl", [{"prompt": "p", "answer": " a", "rejected": " b"}] * 2)
    with pytest.raises(ValueError, match=r"data.init_args.train_data\[1\]: column\(s\) \['chosen'\] missing"):
        set_up(PreferenceDataModule, [{"path": a}, {"path": other}])


def test_weighted_sources_train_from_the_cli(tmp_path) -> None:
    a, b = two_sources(tmp_path)
    recipe = tiny_recipe(tmp_path, a, b)
    recipe["data"]["init_args"]["train_data"] = [{"path": a, "fraction": 0.5}, {"path": b, "rows": 6}]
    recipe["data"]["init_args"]["split_seed"] = 3
    cli = fit(tmp_path, recipe)
    assert cli.trainer.global_step == 2
    assert cli.datamodule.reports["train"].sources == [SourceCount(a, 20, 10), SourceCount(b, 30, 6)]


# --- 6. hub arguments and split slicing -----------------------------------------------------
def test_hub_config_data_dir_and_sliced_split_reach_load_dataset(monkeypatch) -> None:
    from dpo_lightning.data import loading

    calls = []
    rows = datasets.Dataset.from_list(quickstart_rows(5))
    monkeypatch.setattr(loading.datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or rows)
    dm = PreferenceDataModule(train_data="org/prefs", val_data="org/prefs", dataset_config="en", data_dir="cleaned",
                              train_split="train[:10%]", val_split="test[100:200]", tokenizer=TOKENIZER_DIR)
    dm.setup("fit")
    assert calls == [
        (("org/prefs",), {"name": "en", "data_dir": "cleaned", "split": "train[:10%]"}),
        (("org/prefs",), {"name": "en", "data_dir": "cleaned", "split": "test[100:200]"}),
    ]
    calls.clear()
    set_up(PreferenceDataModule, [{"path": "org/a", "split": "train[:50%]", "config": "x", "rows": 2}], dataset_config="en")
    assert calls == [(("org/a",), {"name": "x", "split": "train[:50%]"})]


def test_local_folder_and_files_take_sliced_splits(tmp_path) -> None:
    rows = quickstart_rows(10)
    write_jsonl(tmp_path / "ds" / "train.jsonl", rows)
    write_jsonl(tmp_path / "ds" / "test.jsonl", quickstart_rows(4, "val"))
    tok = shipped()
    whole = set_up(PreferenceDataModule, str(tmp_path / "ds"), tok)
    half = set_up(PreferenceDataModule, str(tmp_path / "ds"), tok, train_split="train[:50%]", val_data=str(tmp_path / "ds"),
                  val_split="test[1:3]")
    middle = set_up(PreferenceDataModule, str(tmp_path / "ds" / "train.jsonl"), tok, train_split="train[2:6]")
    assert whole.reports["train"].rows_read == 10 and half.reports["train"].rows_read == 5
    assert half.reports["val"].rows_read == 2 and middle.reports["train"].rows_read == 4
    assert middle.train_dataset.sort("row_id")["prompt_ids"] == whole.train_dataset.sort("row_id")["prompt_ids"][2:6]


# --- 7. chat-template keyword arguments and tools -------------------------------------------
TOOLS = [{"type": "function", "function": {"name": "get_price", "description": "Price of an item",
                                           "parameters": {"type": "object", "properties": {}}}}]


def test_chat_template_kwargs_and_tools_reach_every_render() -> None:
    tok = thinking_template()
    rows = [{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}]
    plain = set_up(PreferenceDataModule, rows, tok)
    no_think = set_up(PreferenceDataModule, rows, tok, chat_template_kwargs={"enable_thinking": False})
    with_tools = set_up(PreferenceDataModule, rows, tok, tools=TOOLS)
    assert ids(plain)[0] == chat_ids(tok, [USER], True)
    assert ids(no_think)[0] == chat_ids(tok, [USER], True, enable_thinking=False) != ids(plain)[0]
    assert ids(no_think)[1] == ids(plain)[1]  # the reply after the think block is the same
    assert ids(with_tools)[0] == chat_ids(tok, [USER], True, tools=TOOLS)
    assert "get_price" in tok.decode(ids(with_tools)[0])
    # part of the tokenization cache key
    fingerprints = {dm.data_fingerprint for dm in (plain, no_think, with_tools)}
    assert len(fingerprints) == 3
    with pytest.raises(ValueError, match=r"data.init_args.chat_template_kwargs: \['add_generation_prompt'\] are set by dpo-lightning"):
        PreferenceDataModule(train_data="x.jsonl", chat_template_kwargs={"add_generation_prompt": False})


# --- 8. in-memory data ------------------------------------------------------------------------
def test_in_memory_dataset_datasetdict_and_rows(tmp_path) -> None:
    tok = shipped()
    rows = quickstart_rows(6)
    from_file = set_up(PreferenceDataModule, write_jsonl(tmp_path / "t.jsonl", rows), tok)
    expected = from_file.train_dataset["prompt_ids"]
    ds = datasets.Dataset.from_list(rows)
    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(quickstart_rows(3, "val"))})
    assert set_up(PreferenceDataModule, ds, tok).train_dataset["prompt_ids"] == expected
    assert set_up(PreferenceDataModule, rows, tok).train_dataset["prompt_ids"] == expected
    both = set_up(PreferenceDataModule, dd, tok, val_data=dd)
    assert both.train_dataset["prompt_ids"] == expected and both.reports["val"].rows_read == 3
    sliced = set_up(PreferenceDataModule, dd, tok, train_split="train[:2]")
    assert sliced.train_dataset["prompt_ids"] == expected[:2]
    weighted = set_up(PreferenceDataModule, [{"path": ds, "rows": 2}, {"path": rows, "rows": 3}], tok)
    assert [s.taken for s in weighted.reports["train"].sources] == [2, 3]
    assert set_up(SFTDataModule, [{"messages": [USER, GOOD]}], tok).reports["train"].rows_kept == 1
    with pytest.raises(ValueError, match=r"data.init_args.val_data: the DatasetDict has splits \['test', 'train'\], not 'validation'"):
        set_up(PreferenceDataModule, dd, tok, val_data=dd, val_split="validation")


def test_cli_parser_takes_the_new_options(tmp_path, capsys) -> None:
    a, b = two_sources(tmp_path)
    recipe = tiny_recipe(tmp_path, a, b)
    recipe["data"]["init_args"].update({
        "train_data": [{"path": a, "fraction": 0.5}, {"path": b, "rows": 6, "columns": {"prompt": "prompt"}}],
        "columns": {"prompt": "prompt"}, "chat_template_kwargs": {"enable_thinking": False}, "tools": TOOLS,
        "data_dir": None,
    })
    with pytest.raises(SystemExit) as info:
        run(["fit", "--config", write_recipe(tmp_path / "r.yaml", recipe), "--print_config"])
    assert info.value.code in (0, None)
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    assert printed["train_data"][0]["path"] == a and printed["train_data"][1]["rows"] == 6
    assert printed["chat_template_kwargs"] == {"enable_thinking": False} and printed["tools"] == TOOLS
    # the shipped recipe still parses with these type hints
    with pytest.raises(SystemExit):
        run(["fit", "--config", str(Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]["train_data"] == "data/quickstart/train.jsonl"


# --- every shape trains through the Python API too ---------------------------------------------
def python_api_shapes(tmp_path) -> dict:
    """``{name: (module class name, data module class, data-module kwargs)}``."""
    rows = quickstart_rows(12)
    messages = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"].strip()}]}
                for r in rows]
    a, b = two_sources(tmp_path)
    folder = tmp_path / "folder"
    write_jsonl(folder / "train.jsonl", rows)
    return {
        "ultrafeedback": ("PreferenceModule", PreferenceDataModule, {"train_data": ultrafeedback(rows)}),
        "sft messages": ("SFTModule", SFTDataModule, {"train_data": datasets.Dataset.from_list(messages)}),
        "columns mapping": ("PreferenceModule", PreferenceDataModule, {"train_data": se_rows(12), "columns": MAPPING}),
        "weighted sources": ("PreferenceModule", PreferenceDataModule,
                             {"train_data": [{"path": a, "fraction": 0.5}, {"path": b, "rows": 6}]}),
        "sliced split of a folder": ("PreferenceModule", PreferenceDataModule,
                                     {"train_data": str(folder), "train_split": "train[:50%]"}),
        "chat template kwargs": ("PreferenceModule", PreferenceDataModule,
                                 {"train_data": ultrafeedback(rows), "chat_template_kwargs": {"enable_thinking": False}}),
        "in-memory Dataset": ("PreferenceModule", PreferenceDataModule, {"train_data": datasets.Dataset.from_list(rows)}),
        "DatasetDict": ("PreferenceModule", PreferenceDataModule,
                        {"train_data": datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})}),
        "KTO on UltraFeedback rows": ("PreferenceModule", UnpairedDataModule, {"train_data": ultrafeedback(rows)}),
    }


@pytest.mark.parametrize("shape", ["ultrafeedback", "sft messages", "columns mapping", "weighted sources",
                                   "sliced split of a folder", "chat template kwargs", "in-memory Dataset",
                                   "DatasetDict", "KTO on UltraFeedback rows"])
def test_every_shape_trains_through_the_python_api(tmp_path, shape) -> None:
    import lightning as L

    from conftest import tiny_spec
    from dpo_lightning import modules
    from dpo_lightning.losses import KTOLoss

    module_name, data_class, kwargs = python_api_shapes(tmp_path)[shape]
    extra = {"loss": KTOLoss()} if data_class is UnpairedDataModule else {}
    module = getattr(modules, module_name)(model=tiny_spec(), **extra)
    data = data_class(max_length=64, batch_size=2, **kwargs)
    data.connect(module.tokenizer, module.data_requirements)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    assert trainer.global_step == 2
    assert data.reports["train"].rows_kept >= 2

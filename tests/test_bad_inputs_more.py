"""More bad inputs: ones that used to pass silently, and ones that used to end in a traceback.

Each test asserts the message (it names the row, file or config key, and the fix) or the count
in the drop report.
"""

from __future__ import annotations

import math
import shutil

import datasets
import pytest

from conftest import ROOT, TOKENIZER_DIR, quickstart_rows, tiny_recipe, tiny_spec, write_jsonl, write_recipe
from dpo_lightning.cli import run
from dpo_lightning.contract import DataRequirements
from dpo_lightning.data import DROP_REASONS, PreferenceDataModule, SFTDataModule
from dpo_lightning.losses import (
    BradleyTerryLoss, DPOLoss, HingeLoss, IPOLoss, KTOLoss, ODPOLoss, ORPOLoss, SimPOLoss, WithChosenNLL,
)
from dpo_lightning.models import ModelSpec, load_causal_lm, load_tokenizer
from dpo_lightning.modules import PreferenceModule, SFTModule
from tokenizer_kinds import raising_template, shipped

GOOD = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in quickstart_rows(6)]
TINY_MODEL = ROOT / "data" / "tiny-llama"


def set_up(data, module=PreferenceDataModule, tok=None, requirements=None, **kwargs):
    dm = module(train_data=data, **kwargs)
    dm.connect(tok or shipped(), requirements)
    dm.setup("fit")
    return dm


# --- silent until now -------------------------------------------------------------------------
def test_folder_with_two_kinds_of_files_is_an_error(tmp_path) -> None:
    write_jsonl(tmp_path / "d" / "a.jsonl", GOOD[:3])
    datasets.Dataset.from_list(GOOD[3:]).to_parquet(str(tmp_path / "d" / "b.parquet"))
    with pytest.raises(ValueError, match=r"data.init_args.train_data: folder .* holds data files of several kinds "
                                         r"\['.jsonl', '.parquet'\], and datasets would read only one kind; keep one kind"):
        set_up(str(tmp_path / "d"))


def test_folder_with_two_jsonl_files_reads_both(tmp_path) -> None:
    write_jsonl(tmp_path / "d" / "a.jsonl", GOOD[:2])
    write_jsonl(tmp_path / "d" / "b.jsonl", GOOD[2:])
    dm = set_up(str(tmp_path / "d"))
    assert dm.reports["train"].rows_read == 6 and dm.reports["train"].rows_kept == 6


def test_truncation_that_makes_a_pair_identical(tmp_path) -> None:
    tok = shipped()
    row = {"prompt": "Rate it.", "chosen": " fine fine fine fine yes", "rejected": " fine fine fine fine no"}
    prompt_len = len(tok("Rate it.", add_special_tokens=False)["input_ids"]) + 1
    a, b = (tok(row[k], add_special_tokens=False)["input_ids"] for k in ("chosen", "rejected"))
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)  # ids the two completions share
    rows = [{"prompt": "Rate it.", "chosen": " yes", "rejected": " no"}, row]
    dm = set_up(write_jsonl(tmp_path / "t.jsonl", rows), tok=tok, max_length=prompt_len + shared)
    assert dm.reports["train"].dropped == {"identical_pair": 1} and dm.reports["train"].examples == {"identical_pair": [1]}
    kept = set_up(write_jsonl(tmp_path / "t.jsonl", rows), tok=tok, max_length=prompt_len + shared + 1)
    assert kept.reports["train"].rows_kept == 2


def test_column_named_like_prompt_but_for_case_is_an_error(tmp_path) -> None:
    rows = [{"Prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in GOOD]
    with pytest.raises(ValueError, match=r"data.init_args.train_data: column 'Prompt' looks like 'prompt', but column names are "
                                         r"case-sensitive.*rename it to 'prompt', or set data.init_args.columns: \{'Prompt': 'prompt'\}"):
        set_up(write_jsonl(tmp_path / "t.jsonl", rows))
    fixed = set_up(write_jsonl(tmp_path / "t.jsonl", rows), columns={"Prompt": "prompt"})
    assert fixed.reports["train"].rows_kept == 6


def test_csv_cells_none_na_null_are_text(tmp_path) -> None:
    tok = shipped()
    rows = [{"prompt": "None", "chosen": " NA", "rejected": " null"}, {"prompt": "N/A", "chosen": " nan", "rejected": " NULL"}]
    path = tmp_path / "t.csv"
    datasets.Dataset.from_list(rows + GOOD[:2]).to_csv(str(path), index=False)
    dm = set_up(str(path), tok=tok)
    assert dm.reports["train"].rows_kept == 4 and not dm.reports["train"].dropped
    first = dm.train_dataset.sort("row_id")[0]
    assert first["prompt_ids"] == [tok.bos_token_id] + tok("None", add_special_tokens=False)["input_ids"]
    assert first["chosen_ids"] == tok(" NA", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # an empty cell is still missing data
    path.write_text(path.read_text() + ',x,y\n')
    assert set_up(str(path), tok=tok).reports["train"].dropped == {"missing_field": 1}


def test_infinite_scores_are_refused_naming_the_rows(tmp_path) -> None:
    rows = [{**r, "score_chosen": 2.0, "score_rejected": 1.0} for r in GOOD]
    rows[2]["score_chosen"] = math.inf
    rows[4]["score_rejected"] = -math.inf
    scores = DataRequirements(columns=("score_chosen", "score_rejected"))
    with pytest.raises(ValueError, match=r"data.init_args.train_data: column 'score_chosen' must hold finite numbers, but "
                                         r"1 row\(s\) hold NaN or an infinity \(row 2: inf\); fix the scores"):
        set_up(rows, requirements=scores)
    rows[2]["score_chosen"] = 3.0
    with pytest.raises(ValueError, match=r"column 'score_rejected' .* \(row 4: -inf\)"):
        set_up(rows, requirements=scores)
    rows[4]["score_rejected"] = 1.0
    assert set_up(rows, requirements=scores).reports["train"].rows_kept == 6


def test_non_finite_scores_in_a_parquet_file_are_refused_naming_the_rows(tmp_path) -> None:
    """ODPO's scores from a Parquet file: +inf, -inf and NaN are named by row, never trained on."""
    rows = [{**r, "score_chosen": 2.0, "score_rejected": 1.0} for r in GOOD]
    rows[1]["score_chosen"], rows[3]["score_chosen"], rows[5]["score_chosen"] = math.inf, -math.inf, math.nan
    path = tmp_path / "scored.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    scores = DataRequirements(columns=("score_chosen", "score_rejected"))
    with pytest.raises(ValueError, match=r"column 'score_chosen' must hold finite numbers, but 3 row\(s\) hold NaN or an "
                                         r"infinity \(row 1: inf, row 3: -inf, row 5: nan\)"):
        set_up(str(path), requirements=scores)


def test_folder_with_a_file_named_after_no_split_is_refused(tmp_path) -> None:
    """train.jsonl + extra_pairs.jsonl: datasets' file-name-to-split rule would drop the second file."""
    write_jsonl(tmp_path / "d" / "train.jsonl", GOOD[:3])
    write_jsonl(tmp_path / "d" / "extra_pairs.jsonl", GOOD[3:])
    with pytest.raises(ValueError, match=r"data.init_args.train_data: folder .* holds \['extra_pairs.jsonl'\], which datasets "
                                         r"would read into no split .*Rename it after its split \(e.g. train-extra_pairs.jsonl\)"):
        set_up(str(tmp_path / "d"))
    (tmp_path / "d" / "extra_pairs.jsonl").rename(tmp_path / "d" / "train-extra_pairs.jsonl")
    assert set_up(str(tmp_path / "d")).reports["train"].rows_read == 6


# --- tracebacks until now -----------------------------------------------------------------------
def test_empty_data_file_is_named(tmp_path) -> None:
    (tmp_path / "e.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"data.init_args.train_data: .*e.jsonl is empty; write rows to it"):
        set_up(str(tmp_path / "e.jsonl"))
    datasets.Dataset.from_list(GOOD).select([]).to_parquet(str(tmp_path / "e.parquet"))
    with pytest.raises(ValueError, match=r"data.init_args.train_data: .*e.parquet' holds no rows"):
        set_up(str(tmp_path / "e.parquet"))


def test_folder_without_a_train_file_names_the_split(tmp_path) -> None:
    write_jsonl(tmp_path / "d" / "test.jsonl", GOOD)
    with pytest.raises(ValueError, match=r"data.init_args.train_data: folder .* has no split 'train' .*\['test'\].*"
                                         r"data.init_args.train_split"):
        set_up(str(tmp_path / "d"))
    assert set_up(str(tmp_path / "d"), train_split="test").reports["train"].rows_read == 6


def test_path_like_names_never_go_to_the_hub(tmp_path, monkeypatch) -> None:
    from dpo_lightning.data import loading

    def no_hub(source, *args, **kwargs):
        raise AssertionError(f"{source!r} went to datasets.load_dataset")

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "mydata", GOOD)  # a file without an extension
    monkeypatch.setattr(loading.datasets, "load_dataset", no_hub)
    with pytest.raises(ValueError, match=r"data.init_args.train_data: files must all be .json/.jsonl, .parquet or .csv "
                                         r"\(one kind\); the file kind of 'mydata' is unknown \(extension ''\)"):
        set_up("mydata")
    with pytest.raises(FileNotFoundError, match=r"data.init_args.train_data: no file matches 'data/sub/train'"):
        set_up("data/sub/train")
    with pytest.raises(FileNotFoundError, match=r"no file matches './train'"):
        set_up("./train")


def test_hub_id_that_cannot_be_reached_says_so(monkeypatch) -> None:
    from dpo_lightning.data import loading

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/prefs' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(loading.datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"data.init_args.train_data: 'org/prefs' is not a local file or folder .* and the "
                                         r"Hugging Face hub did not provide it \(ConnectionError"):
        set_up("org/prefs")


LOSS = "model.init_args.loss.init_args"


@pytest.mark.parametrize("make,name", [
    (lambda: DPOLoss(beta=math.inf), "beta"),
    (lambda: HingeLoss(beta=math.inf), "beta"),
    (lambda: IPOLoss(beta=math.inf), "beta"),
    (lambda: KTOLoss(undesirable_weight=math.inf), "undesirable_weight"),
    (lambda: ODPOLoss(alpha=math.inf), "alpha"),
    (lambda: ODPOLoss(min_score_diff=math.inf), "min_score_diff"),
    (lambda: ORPOLoss(lam=math.inf), "lam"),
    (lambda: SimPOLoss(gamma=math.inf), "gamma"),
    (lambda: WithChosenNLL(DPOLoss(), weight=math.inf), "weight"),
    (lambda: BradleyTerryLoss(center_rewards_coefficient=math.inf), "center_rewards_coefficient"),
    (lambda: DPOLoss(beta=math.nan), "beta"),
])
def test_infinite_loss_hyperparameters_are_refused(make, name) -> None:
    with pytest.raises(ValueError, match=rf"{LOSS}.{name} must be .* finite, got (inf|nan)"):
        make()


def test_infinite_beta_from_the_cli(tmp_path, pair_files) -> None:
    recipe = tiny_recipe(tmp_path, *pair_files)
    recipe["model"]["init_args"]["loss"]["init_args"]["beta"] = float("inf")
    with pytest.raises(ValueError, match=r"model.init_args.loss.init_args.beta must be > 0 and finite, got inf"):
        run(["fit", "--config", write_recipe(tmp_path / "r.yaml", recipe)])


@pytest.mark.parametrize("kwargs,pattern", [
    ({"eval_batch_size": -1}, r"data.init_args.eval_batch_size must be >= 1"),
    ({"max_rows": -5}, r"data.init_args.max_rows must be >= 1"),
    ({"max_rows": 0}, r"data.init_args.max_rows must be >= 1"),
    ({"columns": ["prompt"]}, r"data.init_args.columns must map column names to column names"),
])
def test_negative_sizes_are_refused(kwargs, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        PreferenceDataModule(train_data="x.jsonl", **kwargs)


def test_max_length_beyond_the_models_positions(tmp_path) -> None:
    module = PreferenceModule(model=tiny_spec())
    assert module.data_requirements.max_positions == 128
    dm = PreferenceDataModule(train_data=write_jsonl(tmp_path / "t.jsonl", GOOD), max_length=256)
    with pytest.raises(ValueError, match=r"data.init_args.max_length is 256 but the model attends over at most 128 positions "
                                         r"\(its config's max_position_embeddings\).*Set data.init_args.max_length <= 128"):
        dm.connect(module.tokenizer, module.data_requirements)
    sft = SFTModule(model=tiny_spec())
    with pytest.raises(ValueError, match=r"max_length is 1024 but the model attends over at most 128"):
        SFTDataModule(train_data="x.jsonl").connect(sft.tokenizer, sft.data_requirements)
    ok = PreferenceDataModule(train_data=write_jsonl(tmp_path / "t.jsonl", GOOD), max_length=128)
    ok.connect(module.tokenizer, module.data_requirements)
    ok.setup("fit")
    assert ok.reports["train"].rows_kept == 6


def test_model_config_vocab_smaller_than_the_tokenizer() -> None:
    spec = tiny_spec()
    spec.config["vocab_size"] = 100
    with pytest.raises(ValueError, match=r"model.init_args.model.config.vocab_size is 100 but the tokenizer has 512 tokens.*"
                                         r"set it >= 512"):
        load_causal_lm(spec, load_tokenizer(spec))


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json"])
def test_truncated_model_or_tokenizer_file_is_named(tmp_path, name) -> None:
    folder = tmp_path / "model"
    shutil.copytree(TINY_MODEL, folder)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=rf"model.name_or_path: .*{name} is damaged or truncated \(.*\); copy or download it again"):
        PreferenceModule(model=ModelSpec(name_or_path=str(folder)))


def test_chat_template_that_raises_on_a_row_drops_and_counts_it(tmp_path) -> None:
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "Review the kettle."}
    good, bad = {"role": "assistant", "content": "Great."}, {"role": "assistant", "content": "Poor."}
    rows = [{"prompt": [user], "chosen": [good], "rejected": [bad]}] * 2 + [{"prompt": [system, user], "chosen": [good], "rejected": [bad]}]
    tok = raising_template()
    dm = set_up(rows, tok=tok)
    report = dm.reports["train"]
    assert report.dropped == {"template_error": 1} and report.examples == {"template_error": [2]}
    assert report.details["template_error"] == "row 2: TemplateError: System role not supported"
    assert "template_error" in DROP_REASONS and "first: row 2: TemplateError" in report.format()
    with pytest.raises(ValueError, match=r"data.init_args.train_data: row 2 is unusable \(template_error: TemplateError: "
                                         r"System role not supported\); fix or remove it"):
        set_up(rows, tok=tok, strict=True)
    sft = set_up([{"messages": [system, user, good]}, {"messages": [user, good]}], SFTDataModule, tok)
    assert sft.reports["train"].dropped == {"template_error": 1}


def test_datasetdict_and_weights_name_what_is_wrong(tmp_path) -> None:
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(GOOD)})
    with pytest.raises(ValueError, match=r"data.init_args.train_data: the DatasetDict has splits \['train'\], not 'training'"):
        set_up(dd, train_split="training")
    a = write_jsonl(tmp_path / "a.jsonl", GOOD)
    with pytest.raises(ValueError, match=r"train_data\[0\].fraction 0.01 of 6 rows is 0 rows"):
        set_up([{"path": a, "fraction": 0.01}])
    with pytest.raises(ValueError, match=r"cannot read the split 'train\[:x\]'"):
        set_up(dd, train_split="train[:x]")


def test_in_memory_rows_with_a_column_of_mixed_kinds(tmp_path) -> None:
    rows = [{**GOOD[0], "score": 1.0}, {**GOOD[1], "score": "high"}]
    with pytest.raises(ValueError, match=r"data.init_args.train_data: column 'score' holds numbers \(first: row 0\) "
                                         r"and plain strings \(first: row 1\)"):
        set_up(rows)


def test_datasets_tokenizer_dir_standalone_still_works(tmp_path) -> None:
    dm = PreferenceDataModule(train_data=write_jsonl(tmp_path / "t.jsonl", GOOD), tokenizer=TOKENIZER_DIR)
    dm.setup("fit")
    assert dm.reports["train"].rows_kept == 6 and dm.batch_columns == ()

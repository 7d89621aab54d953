"""Every console script answers a mistake as a user makes it in one line on stderr (`PROG: error: ...`, naming the
input and saying what to do) with a non-zero exit and no traceback, unless --debug / -v asks for the traceback; and
`--help` prints nothing on stderr. Each case runs the installed console script in a fresh process
(`honeybee-quantize`'s run in tests/integrations/test_quantize.py, in llm-compressor's environment)."""

import json

import pytest

from utils.cli import UPSTREAM_STARTUP_LINES, assert_one_line_error, our_stderr_lines, run_console_script


@pytest.fixture
def model_folder(tiny_folder):
    folder, _, _ = tiny_folder("c-abs")
    return folder


# ---- honeybee-finetune --------------------------------------------------------------------------------------------


def finetune(*args, model, tmp_path):
    return run_console_script("honeybee-finetune", "--model", model, *args, "--output_dir", tmp_path / "run")


def test_finetune_missing_data_file(model_folder, tmp_path):
    result = finetune("--data", tmp_path / "missing.jsonl", model=model_folder, tmp_path=tmp_path)
    assert_one_line_error(result, "honeybee-finetune", "--data", "missing.jsonl", "no such file", "JSONL")
    assert not (tmp_path / "run").exists()


def test_finetune_data_without_a_usable_sample(model_folder, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    result = finetune("--data", empty, model=model_folder, tmp_path=tmp_path)
    assert_one_line_error(result, "honeybee-finetune", "no usable samples in", "empty.jsonl", "none at all")

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}]}) + "\n{not json\n")
    result = finetune("--data", bad, model=model_folder, tmp_path=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    *reports, error = our_stderr_lines(result.stderr)
    assert error.startswith("honeybee-finetune: error: no usable samples in") and "2 bad, reported above" in error
    assert [("bad.jsonl:1" in r, "bad.jsonl:2" in r) for r in reports] == [(True, False), (False, True)], reports


def test_finetune_model_folder_that_does_not_exist(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    result = finetune("--data", data, model=tmp_path / "honeybee-c7b", tmp_path=tmp_path)
    line = assert_one_line_error(result, "honeybee-finetune", "--model", "honeybee-c7b", "no such folder")
    assert "Repo id" not in line


def test_finetune_model_that_is_not_a_honeybee(tmp_path):
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    result = finetune("--data", data, model=model, tmp_path=tmp_path)
    assert_one_line_error(result, "honeybee-finetune", "--model", "gpt2", "not a Honeybee", "honeybee-convert")


def test_finetune_output_dir_or_image_root_that_cannot_be(tmp_path, capsys):
    from honeybee_hf.train import finetune as finetune_module

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # the paths are checked before anything loads
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    args = ["--model", str(model), "--data", str(data)]
    assert finetune_module.main([*args, "--output_dir", str(data)]) == 1
    assert (
        capsys.readouterr().err
        == f"honeybee-finetune: error: --output_dir {data}: a file; pass a folder (created if missing)\n"
    )
    assert (
        finetune_module.main([*args, "--output_dir", str(tmp_path / "run"), "--image_root", str(tmp_path / "x")]) == 1
    )
    assert "--image_root" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_finetune_merge_with_a_wrong_adapter_folder(model_folder, tmp_path):
    result = run_console_script(
        "honeybee-finetune", "merge", "--model", model_folder, "--adapter", tmp_path, "--output", tmp_path / "out"
    )
    assert_one_line_error(result, "honeybee-finetune", "--adapter", "no adapter_config.json", "OUTPUT_DIR/adapter")
    assert not (tmp_path / "out").exists()


def test_finetune_unknown_flag_value_is_one_line_not_the_whole_usage(tmp_path):
    result = run_console_script("honeybee-finetune", "--stage", "everything", "--output_dir", tmp_path)
    assert_one_line_error(result, "honeybee-finetune", "--stage", "everything", "--help", exit_code=2)


# ---- honeybee-convert -----------------------------------------------------------------------------------------------


def test_convert_missing_checkpoint_and_debug_shows_the_traceback(tmp_path):
    args = [tmp_path / "7B-C-Abs-M144.tar.gz", tmp_path / "out", "--tokenizer", tmp_path / "tokenizer.model"]
    result = run_console_script("honeybee-convert", *args)
    assert_one_line_error(result, "honeybee-convert", "7B-C-Abs-M144.tar.gz", "does not exist", "official .tar.gz")
    for flag in ("--debug", "-v"):
        result = run_console_script("honeybee-convert", *args, flag)
        assert result.returncode == 1 and "Traceback" in result.stderr, result.stderr
        assert result.stderr.rstrip().splitlines()[-1].startswith("honeybee_hf.convert.ConversionError: ")


def test_convert_output_that_exists(model_folder, tmp_path):
    (tmp_path / "out").mkdir()
    result = run_console_script("honeybee-convert", model_folder, tmp_path / "out")
    assert_one_line_error(result, "honeybee-convert", str(tmp_path / "out"), "--force")


# ---- honeybee-publish -----------------------------------------------------------------------------------------------


def test_publish_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    result = run_console_script("honeybee-publish", tmp_path, "me/honeybee", "--dry-run")
    assert_one_line_error(result, "honeybee-publish", "no config.json", "honeybee-convert")


# ---- --help: our output only ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [("honeybee-convert",), ("honeybee-publish",), ("honeybee-finetune", "merge"), ("honeybee-finetune",)]
)
def test_help_prints_nothing_on_stderr(command):
    result = run_console_script(*command, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout and "--debug" in result.stdout
    if command[0] == "honeybee-finetune":
        # Its flags are TrainingArguments' fields: parsing them imports transformers' training code, and with it
        # the upstream packages whose start-up lines cli_helpers.UPSTREAM_STARTUP_LINES documents.
        assert our_stderr_lines(result.stderr) == [], result.stderr
    else:
        assert result.stderr == "", f"{UPSTREAM_STARTUP_LINES.keys()}?\n{result.stderr}"

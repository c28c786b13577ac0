"""The `recserve` train/evaluate/export verbs as a user runs them: output and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest


def recserve(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "recserve.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    "content, fragments",
    [
        ("", ["bad.csv: empty file"]),
        ("user_id,item_id\n1,a\n", ["bad.csv, column 'timestamp': missing"]),
        ("user_id,item_id,timestamp\n1,a,1\n1,b,yesterday\n", ["bad.csv line 3, column 'timestamp'", "'yesterday'"]),
    ],
)
def test_train_on_bad_data_prints_one_line(tmp_path, content, fragments):
    data = tmp_path / "bad.csv"
    data.write_text(content)
    proc = recserve("train", tmp_path / "run", "--interactions", data, "--quiet")
    assert_one_line_error(proc, "recserve train: error:", *fragments)


def test_train_needs_interactions(tmp_path):
    assert_one_line_error(recserve("train", tmp_path / "run"), "--interactions is required")
    assert_one_line_error(recserve("train", tmp_path / "run", "--resume"), "nothing to resume")


def test_bad_config_values_and_resume_overrides_are_one_line_errors(tiny_run, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"interactions": "x.csv", "epochs": "3"}')
    assert_one_line_error(recserve("train", tmp_path / "run", "--config", cfg), "config: epochs must be int, got '3'")
    cfg.write_text('{"interactions": "x.csv", "learning_rate": 0.1}')
    assert_one_line_error(recserve("train", tmp_path / "run", "--config", cfg), "unknown key 'learning_rate'")
    assert_one_line_error(recserve("train", tiny_run, "--resume", "--lr", "0.5"), "only --epochs may change")


def test_evaluate_prints_the_table(tiny_run):
    proc = recserve("evaluate", tiny_run, "--baselines", "popularity", "--quiet")
    assert proc.returncode == 0, proc.stderr
    header, model, pop = proc.stdout.strip().splitlines()
    assert header.split()[:3] == ["model", "recall@5", "ndcg@5"]
    assert model.startswith("two_tower (run)") and pop.startswith("popularity")
    assert (tiny_run / "eval.json").is_file()


def test_evaluate_on_a_test_file_with_an_unknown_item(tiny_run, tmp_path):
    test = tmp_path / "heldout.csv"
    test.write_text("user_id,item_id\n3,I001\n4,NOT-AN-ITEM\n")
    proc = recserve("evaluate", tiny_run, "--baselines", "", "--test", test)
    assert_one_line_error(proc, "heldout.csv line 3, column 'item_id': unknown id 'NOT-AN-ITEM'")
    test.write_text("user_id,item_id\n3,I001\nnew-user,I002\n")  # unknown users are cold starts
    proc = recserve("evaluate", tiny_run, "--baselines", "popularity", "--test", test)
    assert proc.returncode == 0, proc.stderr


def test_evaluate_unknown_baseline_and_unfinished_run(tiny_run, tmp_path):
    assert_one_line_error(recserve("evaluate", tiny_run, "--baselines", "oracle"), "unknown baseline 'oracle'")
    assert_one_line_error(recserve("evaluate", tmp_path), "not a finished run")


def test_export_prints_the_version_and_refuses_bad_names(tiny_run, tmp_path):
    proc = recserve("export", tiny_run, "--repository", tmp_path / "repo", "--model", "cli", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1" and (tmp_path / "repo/cli/1/manifest.json").is_file()
    proc = recserve("export", tiny_run, "--repository", tmp_path / "repo", "--model", "../../etc")
    assert_one_line_error(proc, "invalid model name '../../etc'")
    proc = recserve("export", tiny_run, "--repository", tmp_path / "repo", "--model", "x", "--backend", "tflite")
    assert_one_line_error(proc, "--backend")

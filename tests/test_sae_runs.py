"""Run names and the runs table: the name is the one place an SAE run's settings live in a path."""

import json

import pytest

from attnspace.sae.runs import RUN_COLUMNS, parse_run_name, run_name, runs_table


@pytest.mark.parametrize("args", [
    ("base", None, "adam", 4608, 32, False, False, 0),
    ("asi", 64, "sparse_adam", 4608, 50, False, True, 0),
    ("random_subspace", 128, "adam", 2304, 8, True, False, 2),
    ("asi", 128, "adam", 2304, 8, True, True, 11),
])
def test_name_round_trip(args):
    init, d_init, opt, n, k, auxk, centred, replicate = args
    name = run_name(init, d_init, opt, n, k, auxk, centred, replicate)
    assert parse_run_name(name) == dict(init=init, d_init=d_init, optimizer=opt, d_sae=n, k=k, auxk=auxk,
                                        centred=centred, replicate=replicate)


def test_replicate_zero_and_the_uncentred_form_keep_the_plain_name():
    assert run_name("asi", 64, "adam", 4608, 32) == "asi-d64-adam-n4608-k32"
    assert run_name("asi", 64, "adam", 4608, 32, centred=True, replicate=2) == "asi-d64-adam-n4608-k32-c-r2"
    with pytest.raises(ValueError):
        parse_run_name("asi-d64-adam-n4608-k32-r0")  # replicate 0 has one name only


def test_bad_name_says_what_a_name_looks_like():
    with pytest.raises(ValueError, match="asi-d64-adam-n4608-k32"):
        parse_run_name("asi-64-adam")


def test_table_marks_failed_runs(tmp_path):
    paths = []
    for run, nmse in (("base-d0-adam-n96-k4", 0.3), ("asi-d8-adam-n96-k4", float("nan"))):
        path = tmp_path / "saes/tiny/pydocs/L2/attn_out" / run / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"nmse": nmse, "dead_fraction": 0.1, "tokens_trained": 1024}))
        paths.append(path)
    table = runs_table(paths)
    assert list(table.columns) == RUN_COLUMNS
    assert table["status"].tolist() == ["ok", "failed"]
    assert table["d_init"].tolist()[1] == 8 and table["layer"].tolist() == [2, 2]

"""The run record package: cheap to import, below the code that uses it, one spelling of the VE key names."""
import json
import subprocess
import sys
from pathlib import Path

import math
import shutil

import pytest

from common.errors import UserError
from records import (SCHEMA_VERSION, LayerRow, Record, Summary, append_record, onset_step, read_records, skipped_record,
                     solved_step, ve_keys)

ROOT = Path(__file__).resolve().parents[1]
V1 = ROOT / "tests" / "fixtures" / "run_v1"  # written by train.py before records carried schema_version


def test_importing_records_loads_no_torch_matplotlib_or_the_code_that_uses_it():
    loaded = ("torch", "matplotlib", "lightning", "callbacks", "tasks", "analysis", "run", "train")
    code = f"import json, sys, records; print(json.dumps([m for m in {loaded!r} if m in sys.modules]))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []  # a fresh process: nothing else has loaded them


def test_ve_keys_name_the_measurement_its_nulls_and_the_content_marginal_split():
    assert ve_keys(8) == {"ve": "ve@8", "post": "ve@8_post", "shuffle": "ve@8_shuffle", "gauss": "ve@8_gauss",
                          "content": "content@8", "marginal": "marginal@8"}
    assert ve_keys("ve@4_features")["gauss"] == "ve@4_features_gauss"  # graphs: VE of the layer features


def test_a_skipped_step_is_read_back_only_on_request(tmp_path):
    append_record(tmp_path, {"step": 0, "layers": [], "summary": {}})
    append_record(tmp_path, skipped_record(4, "non-finite weights"))
    assert [r["step"] for r in read_records(tmp_path)] == [0]
    assert read_records(tmp_path, skipped=True)[-1] == {"schema_version": 2, "step": 4, "skipped": "non-finite weights"}
    assert read_records(tmp_path, skipped=True)[-1].skipped == "non-finite weights"


def test_a_run_written_before_schema_version_reads_as_version_1_with_every_field_typed():
    first, last = read_records(V1)
    assert isinstance(last, Record) and isinstance(last.summary, Summary) and isinstance(last.layers[0], LayerRow)
    assert (first.version, last.version) == (1, 1)
    raw = json.loads((V1 / "collapse.jsonl").read_text().splitlines()[-1])
    # typed fields are the stored values; null reads as nan for numbers, None for indices
    assert last.step == raw["step"] == 1000 and last.val_loss == raw["val_loss"]
    assert last.summary.peak_max_share == raw["summary"]["peak_max_share"]
    assert last.summary.peak_layer == raw["summary"]["peak_layer"]
    assert math.isnan(first.train_loss) and last.train_loss == raw["train_loss"]  # step 0 has none yet (null)
    assert last.layers[2].ve(8).shuffle == raw["layers"][2]["ve@8_shuffle"]
    assert last.layers[2].ve(8).content == pytest.approx(last.layers[2].ve(8).ve - last.layers[2].ve(8).shuffle)
    assert last.layers[4].sink_source_units == raw["layers"][4]["sink_source_units"]
    assert last.solved_loss == raw["solved_loss"] and last.idle_fraction == raw["idle_fraction"]
    # re-thresholding from the stored curve agrees with what the monitor recorded at its own threshold
    assert last.onset_layer(raw["summary"]["onset_threshold"]) == raw["summary"]["onset_layer"]
    assert math.isnan(onset_step([first, last], 0.99))
    assert solved_step([first, last], margin=0.15) == 1000.0 and math.isnan(solved_step([first, last], margin=0.1))


def test_a_record_written_again_is_the_same_bytes_plus_its_version(tmp_path):
    line = (V1 / "collapse.jsonl").read_text().splitlines()[-1]
    append_record(tmp_path, read_records(V1)[-1])
    again = (tmp_path / "collapse.jsonl").read_text().splitlines()[-1]
    assert again == line  # a v1 record keeps its bytes: no field is added on the way through
    assert json.loads(line) == read_records(tmp_path)[-1]


def test_a_newer_schema_is_refused_in_one_line_naming_the_versions(tmp_path):
    (tmp_path / "collapse.jsonl").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1, "step": 0}) + "\n")
    with pytest.raises(UserError, match=f"schema_version {SCHEMA_VERSION + 1}.*up to {SCHEMA_VERSION}") as e:
        read_records(tmp_path)
    assert "\n" not in str(e.value) and "collapse.jsonl, line 1" in str(e.value)


def test_an_old_run_still_loads_in_a_sweep_analysis(tmp_path):
    import analyze

    sweep = tmp_path / "sweep"
    shutil.copytree(V1, sweep / "0")
    assert analyze.main([f"sweep={sweep}", "threads=1"]) == 0
    rows = (sweep / "analysis" / "sweep.csv").read_text().splitlines()
    header, row = rows[0].split(","), rows[1].split(",")
    assert float(row[header.index("peak")]) == pytest.approx(read_records(V1)[-1].summary.peak_max_share)


def test_every_key_of_a_real_record_is_a_declared_column():
    from records.columns import column, registry, undeclared

    for record in read_records(V1):
        assert undeclared(record) == []
    assert column("ve@8_shuffle", "layer").meaning.startswith("VE@r of the same router")
    assert column("peak_max_share", "summary").meaning == "its max share"
    assert column("delta_cv", "layer").only.startswith("routing that carries step sizes")
    names = {(c.part, c.name) for c in registry()}
    assert ("record", "schema_version") in names and ("layer", "sink_source_units") in names
    odd = read_records(V1)[-1]
    odd.layers[0]["new_metric"] = 1.0  # a column nobody declared is caught
    assert undeclared(odd) == ["layer:new_metric"]

"""The run record package: cheap to import, below the code that uses it, one spelling of the VE key names."""
import json
import subprocess
import sys
from pathlib import Path

from records import append_record, read_records, skipped_record, ve_keys

ROOT = Path(__file__).resolve().parents[1]


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
    assert read_records(tmp_path, skipped=True)[-1] == {"step": 4, "skipped": "non-finite weights"}

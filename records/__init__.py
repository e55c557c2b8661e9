"""The run record: what the collapse monitor writes into a run directory, and everything that reads it back.

One record is one JSON line of ``collapse.jsonl``: its schema version, the step, the losses, the task's levels
and the signature (per layer and its summary). This package owns the record: its typed fields
(``records.record``: :class:`Record`, :class:`LayerRow`, :class:`Summary`, and re-thresholding), its column
registry (``records.columns``), its codecs (``records.codecs``: the JSON line, the flat metric keys of W&B and
the CSV logger and their read-back, the printed signature table), the file names, the end-of-training table
and the two figures drawn from a run's records. It imports no Lightning glue (``callbacks/``, ``tasks/``), no
analysis and no entry point: they all import it. Importing it loads neither torch nor matplotlib (imported
when a figure is drawn), so reading a run's records is quick anywhere. Measuring lives in ``collapse.measure``.
"""
from records.codecs import (flat_metrics, from_history, layer_table, measurement_metrics, signature_parts,
                            signature_table, unit_table)
from records.figures import depth_profile_figure, max_share_heatmaps, save_run_figures
from records.files import HEATMAP_PNG, JSONL, PROFILE_PNG, append_record, read_records
from records.record import (SCHEMA_VERSION, VE, LayerRow, Record, Summary, number, onset_step, solved_step, typed,
                            ve_keys)
from records.schema import column, model_record, new_record, skipped_record
from records.text import progress_line, training_table

__all__ = [
    "HEATMAP_PNG", "JSONL", "PROFILE_PNG", "SCHEMA_VERSION", "VE", "LayerRow", "Record", "Summary", "append_record",
    "column", "depth_profile_figure", "flat_metrics", "from_history", "layer_table", "max_share_heatmaps",
    "measurement_metrics", "model_record", "new_record", "number", "onset_step", "progress_line", "read_records", "save_run_figures", "signature_parts",
    "signature_table", "skipped_record", "solved_step", "training_table", "typed", "unit_table", "ve_keys",
]

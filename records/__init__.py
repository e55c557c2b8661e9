"""The run record: what the collapse monitor writes into a run directory, and everything that reads it back.

One record is one JSON line of ``collapse.jsonl``: the step, the losses, and the signature (per layer and its
summary). This package owns the file names, writing and reading those lines, the per-layer key names, the
end-of-training table, the two figures drawn from a run's records, and (``records.measure``, the one part that
needs torch) the measurement a record holds. It imports no Lightning glue (``callbacks/``, ``tasks/``), no
analysis and no entry point: they all import it. Importing it loads neither torch nor matplotlib (imported
when a figure is drawn), so reading a run's records is quick anywhere.
"""
from records.figures import depth_profile_figure, max_share_heatmaps, save_run_figures
from records.files import HEATMAP_PNG, JSONL, PROFILE_PNG, append_record, read_records
from records.schema import geometry_column, new_record, skipped_record, ve_keys
from records.text import progress_line, training_table

__all__ = [
    "HEATMAP_PNG", "JSONL", "PROFILE_PNG", "append_record", "depth_profile_figure", "geometry_column",
    "max_share_heatmaps", "new_record", "progress_line", "read_records", "save_run_figures",
    "skipped_record", "training_table", "ve_keys",
]

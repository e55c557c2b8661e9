"""The end-of-training table reads the right geometry column for each router family."""
from records import training_table, typed


def record(step, ve_key, ve, share, onset=None):
    layer = {"norm_cv": 0.1, ve_key: ve, f"{ve_key}_gauss": 0.2, "max_share": share}
    return typed({"step": step, "layers": [layer], "summary": {"onset_layer": onset, "peak_max_share": share,
                                                          "peak_layer": 0, "onset_threshold": 0.2}})


def test_training_table_shows_both_steps_and_the_onset_change():
    text = training_table(record(0, "ve@8", 0.31, 0.04), record(1200, "ve@8", 0.62, 0.25, onset=0))
    assert "VE@8" in text and "0.310 ->  0.620" in text and "0.040 ->  0.250" in text
    assert "never -> L0" in text


def test_training_table_uses_full_width_features_for_graphs():
    text = training_table(record(0, "ve@4_features", 0.5, 0.1), record(400, "ve@4_features", 0.9, 0.1))
    assert "VE@4 feat" in text and "0.500 ->  0.900" in text

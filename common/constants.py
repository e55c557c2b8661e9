"""The paper's constants, in one place: every default threshold and rank in the code reads them from here.

Changing one here changes what the monitor records and what analysis reports by default; a run or an
analysis can still pass its own (``callbacks.collapse_monitor.onset_threshold=...``, ``analyze.py rank=4``).
"""
ONSET_THRESHOLD = 0.20       # a layer's max share above this marks the onset of concentration
COMPLETION_THRESHOLD = 0.50  # ... above this, completion (a sink takes most of the routing)
RANKS = (1, 4, 8)            # VE@r measured at these ranks
RANK = 8                     # the headline rank of the token and time routers' tables and studies
SOLVED_MARGIN = 0.10        # nats: a task counts as solved once validation loss is within this of its solved level
PARKING_SINK_FRACTION = 0.5  # a head parks on BOS when BOS tops its operator in at least this share of sequences
FEATURE_RANK = 4             # the graph routers' headline: VE@4 of the 64-wide node features
LEVEL = 0.95                 # confidence level over seeds of the t-intervals (primary) and bootstrap intervals
LATE_FRACTION = 0.75         # RWKV content/recency: queries t >= 0.75 T, sources s < 0.75 T (96 of 128)

"""Reading what was trained: run directories and sweeps (``runs``, W&B groups included), our checkpoints and
Hugging Face ones as routers (``hf``), and one model's signature on a probe (``model``)."""

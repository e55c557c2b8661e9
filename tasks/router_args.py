"""The router's resolved constructor arguments, stored in every checkpoint (``hyper_parameters.router``).

train.py builds the router from its config node plus what the data fills in at build time (the vocabulary
size of a token corpus, a graph's feature and class counts: ``datamodule.model_kwargs()``). Storing the
result lets ``analyze.py`` rebuild any router, token or graph, with ``hydra.utils.instantiate`` and
``load_state_dict``, without reading shapes back from parameter names.
"""
from __future__ import annotations

KEY = "router"  # hyper_parameters[KEY] in a checkpoint


def router_args(config: dict | None, datamodule) -> dict | None:
    """``config["router"]`` (``_target_`` included) with the datamodule's ``model_kwargs()`` over it: the
    arguments train.py passed. None when the run has no config or the data fill in nothing we can ask."""
    if not config or not isinstance(config.get("router"), dict) or not hasattr(datamodule, "model_kwargs"):
        return None
    return {**config["router"], **{key: _plain(value) for key, value in datamodule.model_kwargs().items()}}


def _plain(value):
    """Checkpoints load with ``weights_only=True``: Python scalars, never numpy or tensor ones."""
    return value.item() if hasattr(value, "item") else value


def store_router_args(task) -> None:
    """From a task's ``setup()``: record the router's arguments in its hyperparameters (saved with every
    checkpoint) unless they were given; the trainer's datamodule is the one the router was built from."""
    if task.hparams.get(KEY) is None:
        task.hparams[KEY] = router_args(task.hparams.get("config"), getattr(task.trainer, "datamodule", None))

"""Reports: per-run statistics and tables (``tables``), figures, across-seed statistics (``stats``) and the
W&B log of an analysis (``wandb_log``). They take plain rows and arrays; they read no run and judge no study."""

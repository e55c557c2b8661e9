"""Post-hoc analysis, split by role; arrows point down this list and never back:

    commands.py  what ``analyze.py`` does for each target (run=, model=, sweep=, study=): read, compute, write
    studies/     the studies: a spec (``conf/study/*.yaml``) read as arms x seeds, and each study's verdict
    readers/     reading runs, sweeps (local or W&B) and models (our checkpoints, Hugging Face ones) into records
    reports/     tables, figures, statistics and the W&B log of an analysis: plain rows in, files out
"""

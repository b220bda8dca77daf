"""Ray Tune sweeps over the pipeline: the SFT/preference split of a fixed data budget, and SamS settings.

    config.py     TuneConfig: the base pipeline, the search space, search algorithm and scheduler (YAML)
    trainable.py  one trial = a small pipeline (SFT -> DPO) on its share of the budget, then held-out metrics
    run.py        the Tuner: resources that fit the cluster, restore of an interrupted experiment
    trials.py     the trials of an experiment directory, read as plain files
    analysis.py   the report's statistics: intervals over seeds, best split, iso-performance, cold start
    report.py     the sweep report (markdown + PNG) from a finished experiment directory
    cli.py        `unipipe tune`, `unipipe sweep-report`
"""

"""The chained run: SFT -> RM -> PPO -> DPO (any subset) with a manifest, resume and a report.

    chain.py     each stage's config with the chain filled in (input models, output dirs); what the user set wins
    manifest.py  <run_dir>/manifest.json: per stage its resolved config, status, checkpoint, metrics, timings
    run.py       decide per stage (skip / resume / run), run it, record it; ``unipipe run``
    report.py    every stage's model on one held-out set (eval/), training curves as PNG, report.md
"""

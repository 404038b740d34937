"""Research features beside the default pipeline: the design note's future work, kept because
studying influence approximations is a main use, but not what the default runs (README,
"Research"). The core imports them lazily, only when a flag asks for one.

    predictor  a learned influence predictor (`--influence predictor`)
    select     the candidate scores of `--score auto` and the choice among them on validation data
    suggest    which unlabelled images to label next (`pn-jax suggest`)
    explain    per-region top dimensions of the whitened residual (the run's explain_*.png panels)
"""

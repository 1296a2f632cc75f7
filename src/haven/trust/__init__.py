"""trust: the evaluate stage (:mod:`haven.trust.evaluate`) and the checks it runs, one module each:
metrics, calibration, subgroups, explain, robustness, plots."""

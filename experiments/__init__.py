"""Experiments with the agents: ``python -m experiments.compare`` runs samplers x seeds (x batch sizes)
and reports them with rliable's statistics.

* :mod:`experiments.runs`: command lines, launching, reuse and resume, what a run wrote;
* :mod:`experiments.stats`: aggregate metrics with stratified-bootstrap CIs, P(> uniform), normalisation;
* :mod:`experiments.reports`: tables (markdown, CSV) and plots of one task;
* :mod:`experiments.sweep`: the batch-size sweep;
* :mod:`experiments.aggregate`: several tasks at once;
* :mod:`experiments.compare`: the command line.
"""

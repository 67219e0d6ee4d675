"""Experiments with the agents: ``python -m experiments.compare`` runs samplers x seeds (x batch sizes)
and reports them with rliable's statistics.

* :mod:`experiments.config`: the command line's :class:`~experiments.config.Config` and the score it ranks
  runs by; every module below reads it, none imports :mod:`experiments.compare`;
* :mod:`experiments.runs`: command lines, launching, reuse and resume, what a run wrote;
* :mod:`experiments.stats`: each run's score (final or a window's mean), aggregate metrics with
  stratified-bootstrap CIs, P(> uniform), normalisation;
* :mod:`experiments.contrasts`: one sampler against the others, Holm-corrected (``--focus``);
* :mod:`experiments.reports`: tables (markdown; CSV through pandas) and plots of one task;
* :mod:`experiments.sweep`: the batch-size sweep;
* :mod:`experiments.aggregate`: several tasks at once;
* :mod:`experiments.compare`: the command line;
* :mod:`experiments.export`: a study's curves as one compact CSV, and the reader that recomputes from it;
* :mod:`experiments.replication`: issue 30's results page, from that CSV.
"""

"""Single-file training scripts: ``python -m agents.dqn --help`` (and c51, sac, td3, compare)."""

"""The benchmarks: scripts run as modules from the project root (``python -m perf.bench_update``), which
print tables and write CSV files; ``perf.common`` holds their timer and CSV writer."""

"""scsnet benchmarks: numbers printed and written to benchmarks/RESULTS.md, never timed tests."""

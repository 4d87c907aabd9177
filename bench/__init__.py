"""The benchmarks (``make bench``: ``python -m bench.run``), a module per benchmark; their figures
go to bench/RESULTS.md. A package of the checkout, not of the wheel (README, Development → Layout)."""

"""Speed and memory measurements (not tests): each module runs with ``python -m benchmarks.<name>``.

They import only ``pipeline``, ``features`` and ``models``, report ratios, and write
``benchmarks/results/*.json``. See docs/benchmarks.md.
"""

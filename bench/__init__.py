"""Benchmarks of quadmix-spark: each module measures one thing against a baseline run in the same process.

Run them with ``python -m bench.run`` (``make bench``); see ``bench/README.md``.
"""

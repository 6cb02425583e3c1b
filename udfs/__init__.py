"""Model adapters that run inside Spark's Python workers (shipped in the wheel as ``quadmix_udfs``).

Each adapter loads its model once per Python worker (an ``lru_cache`` loader in an importable module,
never a closure), so tasks reuse it and nothing model-related is pickled with the UDF.
"""

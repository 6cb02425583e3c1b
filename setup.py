"""The compiled parts: the fast tokenizer's inner loop (udfs/_bpe_native.c) and the text statistics kernel
(udfs/_text_stats_native.c). Everything else is in pyproject.toml. The modules use CPython's stable ABI (3.11),
so one wheel serves every later Python on the same platform; ``-g0`` keeps build paths out of them, so the same
sources give the same wheel bytes. ``optional``: without a C compiler the install still succeeds, and
``quadmix_udfs.bpe_fast`` and ``quadmix_udfs.text_stats`` run their Python/numpy paths (each says which one
it uses)."""

from setuptools import Extension, setup


def _native(name: str) -> Extension:
    return Extension(f"quadmix_udfs.{name}", [f"udfs/{name}.c"], extra_compile_args=["-g0"],
                     define_macros=[("Py_LIMITED_API", "0x030B0000")], py_limited_api=True, optional=True)


setup(
    ext_modules=[_native("_bpe_native"), _native("_text_stats_native")],
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)

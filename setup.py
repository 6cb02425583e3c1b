"""The one compiled part: the fast tokenizer's inner loop (udfs/_bpe_native.c). Everything else is in
pyproject.toml. The module uses CPython's stable ABI (3.11), so one wheel serves every later Python on the
same platform; ``-g0`` keeps build paths out of it, so the same sources give the same wheel bytes.
``optional``: without a C compiler the install still succeeds and ``quadmix_udfs.bpe_fast`` runs its
pure-Python path (it says which one it uses)."""

from setuptools import Extension, setup

setup(
    ext_modules=[Extension("quadmix_udfs._bpe_native", ["udfs/_bpe_native.c"], extra_compile_args=["-g0"],
                           define_macros=[("Py_LIMITED_API", "0x030B0000")], py_limited_api=True, optional=True)],
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)

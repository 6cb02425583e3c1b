"""The GPU-machine bundle's pure parts: which jars go, jars packed again, pieces cut (no JDK, pip or xz run)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pyspark

from bench.gpu_bundle import keep_jar, rezip_all, split


def test_optional_spark_modules_are_left_out_and_what_spark_sql_and_delta_load_stays():
    jars = {p.name for p in (Path(pyspark.__file__).parent / "jars").glob("*.jar")}
    kept = {j for j in jars if keep_jar(j)}
    for prefix in ("hive-exec", "rocksdbjni", "spark-connect_", "spark-mllib_", "kubernetes-model-core", "breeze_"):
        assert not any(j.startswith(prefix) for j in kept), prefix
    # found the hard way: Spark SQL loads jts (geometry types) and Ivy (spark-submit's argument parser)
    for prefix in ("spark-core_", "spark-sql_", "spark-catalyst_", "hadoop-client-api", "hadoop-client-runtime",
                   "parquet-hadoop", "arrow-vector", "py4j", "jts-core", "ivy-", "icu4j", "scala-library"):
        assert any(j.startswith(prefix) for j in kept), prefix
    assert 0.3 < len(kept) / len(jars) < 0.8


def test_unpacked_jars_are_packed_again_where_spark_and_the_delta_cache_look(tmp_path):
    root = tmp_path / "b"
    spark_jar = root / "jx" / "pyspark" / "core.jar.d"
    delta_jar = root / "jx" / "delta" / "io.delta_pkg" / "delta.jar.d"
    for folder, classes in ((spark_jar, {"org/a/A.class": b"\xca\xfe1"}), (delta_jar, {"io/d/D.class": b"\xca\xfe2"})):
        for rel, data in {"org/z/Z.class": b"z", "META-INF/INDEX.LIST": b"stale", "META-INF/MANIFEST.MF": b"Manifest-Version: 1.0\n",
                          **classes}.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
    assert rezip_all(root) == 2
    with zipfile.ZipFile(root / "site" / "pyspark" / "jars" / "core.jar") as z:
        names = z.namelist()
        assert names[0] == "META-INF/MANIFEST.MF" and "META-INF/INDEX.LIST" not in names
        assert z.read("org/a/A.class") == b"\xca\xfe1" and z.getinfo("org/z/Z.class").compress_type == zipfile.ZIP_STORED
    with zipfile.ZipFile(root / "cache" / "jars" / "io.delta_pkg" / "delta.jar") as z:
        assert z.read("io/d/D.class") == b"\xca\xfe2"


def test_the_stream_is_cut_into_pieces_that_join_back(tmp_path):
    stream = tmp_path / "bundle.tar.xz"
    data = bytes(range(256)) * 2000  # 512,000 bytes
    stream.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    folders = split(stream, out, 200_000)  # the first piece keeps 100,000 bytes free for setup.sh
    assert [f.name for f in folders] == ["piece-00", "piece-01", "piece-02", "piece-03"]
    parts = [next(f.iterdir()) for f in folders]
    assert [p.stat().st_size for p in parts] == [100_000, 200_000, 200_000, 12_000]
    assert b"".join(p.read_bytes() for p in sorted(parts, key=lambda p: p.name)) == data


def test_setup_script_parses_and_needs_the_pieces_folder(tmp_path):
    import subprocess

    from bench.gpu_bundle import SETUP

    script = tmp_path / "setup.sh"
    script.write_text(SETUP)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    missing = subprocess.run(["bash", "-c", f"source {script}"], capture_output=True, text=True)
    assert missing.returncode != 0 and "name the folder" in missing.stderr

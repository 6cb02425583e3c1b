"""A self-contained runtime for ``bench.gpu_annotate`` on a GPU machine that has Python, torch and CUDA but no
Java, pyspark, Delta jars or onnxruntime-gpu, and no network (the lent H100/H200 machines are such).

Run here, in the project's environment (a JDK with ``jmods`` as ``JAVA_HOME``, the Delta jars cached)::

    python -m bench.gpu_bundle --out /tmp/gpu-bundle            # -> piece-00/ ... piece-NN/, each < --piece-mb

What goes in (one ``tar.xz`` stream, cut into pieces):

- ``jre/``: a Java 17 runtime made by ``jlink`` with the modules Spark uses (~57 MB);
- ``site/``: pyspark and py4j as installed here, with Spark's optional modules' jars left out (Hive, Kubernetes,
  YARN, MLlib, Connect, RocksDB, ...: ``OPTIONAL_JARS``), delta-spark's Python package, and the wheels for
  the GPU machine's Python (``--python``): onnxruntime-gpu (``--onnxruntime-gpu``), pydantic and its needs;
- ``cache/``: the Delta jars of ``python -m quadmix_spark.core.jars`` (``QUADMIX_CACHE`` there);
- ``shared/``: the shared web pages and the BERT-uncased tokenizer the benchmark reads;
- the jars unpacked (``jx/``): xz compresses classes across jars ~2x better than the jars' own zip;
  ``--rezip`` packs them again, stored, on the GPU machine.

There, with every piece's files copied into one folder ``S`` (``piece-00`` holds ``setup.sh``)::

    source S/setup.sh S && python3 -m bench.gpu_annotate --fuse --out $OUT/gpu.json

``setup.sh`` unpacks once into ``/tmp/quadmix-gpu`` (``$2`` to change), re-zips the jars and exports
``JAVA_HOME``, ``PYTHONPATH``, ``QUADMIX_CACHE``, ``QUADMIX_SHARED``, ``PYSPARK_PYTHON`` and an
``LD_LIBRARY_PATH`` holding torch's ``nvidia/*/lib`` (the CUDA 13 and cuDNN libraries onnxruntime-gpu loads).
It must be sourced from the repository's root (the checkout is on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# java.* and jdk.* modules Spark 4.2, Delta and Py4J load (jdk.incubator.vector: Spark's vectorized paths)
JRE_MODULES = (
    "java.base,java.compiler,java.datatransfer,java.desktop,java.instrument,java.logging,java.management,"
    "java.management.rmi,java.naming,java.net.http,java.prefs,java.rmi,java.scripting,java.security.jgss,"
    "java.security.sasl,java.sql,java.sql.rowset,java.transaction.xa,java.xml,java.xml.crypto,jdk.crypto.ec,"
    "jdk.crypto.cryptoki,jdk.jfr,jdk.management,jdk.management.jfr,jdk.net,jdk.unsupported,jdk.zipfs,"
    "jdk.security.auth,jdk.security.jgss,jdk.charsets,jdk.naming.dns,jdk.httpserver,jdk.jdi,jdk.attach,"
    "jdk.incubator.vector,jdk.incubator.foreign,jdk.jdwp.agent"
)

# pyspark jars a local Spark SQL + Delta job never loads (checked by running the annotate stage without them)
OPTIONAL_JARS = (
    "kubernetes-*", "vertx-*", "hive-*", "datanucleus-*", "derby*", "curator-*", "zookeeper*", "spire*",
    "spark-kubernetes*", "spark-yarn*", "spark-hive*", "spark-pipelines*", "spark-graphx*", "spark-repl*",
    "spark-mllib*", "spark-connect*", "lapack-*", "arpack*", "rocksdbjni*", "breeze*", "scala-compiler*",
    "cats-kernel*", "algebra_*", "volcano-*", "JTransforms*", "JLargeArrays*", "libthrift*", "libfb303*",
    "javolution*", "jdo-api*", "javax.jdo*", "HikariCP*", "commons-dbcp*",
    "netty-tcnative-boringssl-static-*osx*", "netty-tcnative-boringssl-static-*windows*",
    "netty-tcnative-boringssl-static-*aarch*", "netty-transport-native-*aarch*", "netty-transport-native-*riscv*",
    "netty-transport-native-kqueue*",
)

WHEELS = ("pydantic=={pydantic}", "pydantic_core=={pydantic_core}", "annotated_types", "typing_inspection")


def keep_jar(name: str) -> bool:
    return not any(fnmatch.fnmatch(name, pattern) for pattern in OPTIONAL_JARS)


def rezip(folder: Path, jar: Path) -> None:
    """Pack an unpacked jar again, stored, the manifest first; a jar index is dropped (it would be stale)."""
    files = sorted((p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()),
                   key=lambda x: (x != "META-INF/MANIFEST.MF", x))
    with zipfile.ZipFile(jar, "w", zipfile.ZIP_STORED) as z:
        for rel in files:
            if rel != "META-INF/INDEX.LIST":
                z.write(folder / rel, rel)


def rezip_all(root: Path) -> int:
    """On the GPU machine: every unpacked jar of the bundle at ``root`` packed again where Spark looks for it."""
    n = 0
    for unpacked, dest in ((root / "jx" / "pyspark", root / "site" / "pyspark" / "jars"),
                           (root / "jx" / "delta", root / "cache" / "jars")):
        for folder in sorted(unpacked.rglob("*.jar.d")):
            target = dest / folder.relative_to(unpacked).parent / folder.name[: -len(".d")]
            target.parent.mkdir(parents=True, exist_ok=True)
            rezip(folder, target)
            n += 1
    return n


SETUP = '''# source S/setup.sh S [BUNDLE]: unpack the bundle's pieces from S once, then export the environment
S=$(cd "${1:?name the folder holding the files of every piece}" && pwd); B=${2:-/tmp/quadmix-gpu}
if [ ! -f "$B/.done" ]; then
  mkdir -p "$B" && cat "$S"/bundle.tar.xz.* | xz -dc -T0 | tar -x -C "$B" && python3 -m bench.gpu_bundle --rezip "$B" \\
    && rm -rf "$B/jx" && touch "$B/.done" || return 1
fi
mkdir -p "$B/qu" && ln -sfn "$PWD/udfs" "$B/qu/quadmix_udfs"
export JAVA_HOME=$B/jre PATH=$B/jre/bin:$PATH QUADMIX_CACHE=$B/cache QUADMIX_SHARED=$B/shared
export PYTHONPATH=$B/site:$B/qu:$PWD SPARK_LOCAL_IP=127.0.0.1 PYTHONUNBUFFERED=1
export PYSPARK_PYTHON=$(command -v python3) PYSPARK_DRIVER_PYTHON=$(command -v python3)
NV=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])" 2>/dev/null) && \\
  export LD_LIBRARY_PATH=$(find "$NV" -name 'lib*.so*' -printf '%h\\n' | sort -u | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
'''


def unpack_jar(jar: Path, folder: Path) -> None:
    with zipfile.ZipFile(jar) as z:
        z.extractall(folder / f"{jar.name}.d")


def pip_wheels(names: list[str], python: str, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                                              "manylinux2014_x86_64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    f"--python-version={python}", "--implementation=cp", *platforms, "-d", str(dest), *names], check=True)
    return sorted(dest.glob("*.whl"))


def build(args: argparse.Namespace) -> list[Path]:
    import pydantic
    import pydantic_core
    import pyspark

    sys.path.insert(0, str(REPO))
    from quadmix_spark.core.jars import cached_delta_jars

    delta_jars = cached_delta_jars()
    if not delta_jars:
        raise SystemExit("no cached Delta jars: run `python -m quadmix_spark.core.jars` (make setup) first")
    java_home = Path(os.environ.get("JAVA_HOME") or Path(shutil.which("java")).resolve().parents[1])
    if not (java_home / "jmods").is_dir():
        raise SystemExit(f"{java_home} has no jmods: point JAVA_HOME at a full JDK 17+ for jlink")
    shared = Path(os.environ.get("QUADMIX_SHARED") or REPO.parent / "shared") / "data"
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="gpu-bundle-") as tmp:
        root = Path(tmp) / "b"
        subprocess.run([str(java_home / "bin" / "jlink"), "--add-modules", JRE_MODULES, "--strip-debug", "--no-man-pages",
                        "--no-header-files", "--compress=2", "--output", str(root / "jre")], check=True)
        site = root / "site"
        spark_dir = Path(pyspark.__file__).parent
        shutil.copytree(spark_dir, site / "pyspark", ignore=shutil.ignore_patterns("__pycache__", "*.jar", "tests", "examples"))
        for jar in sorted((spark_dir / "jars").glob("*.jar")):
            if keep_jar(jar.name):
                unpack_jar(jar, root / "jx" / "pyspark")
        for pkg in ("py4j", "delta"):
            mod = __import__(pkg)
            shutil.copytree(Path(mod.__file__).parent, site / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        for jar in map(Path, delta_jars):
            unpack_jar(jar, root / "jx" / "delta" / jar.parent.name)
        manifest = Path(delta_jars[0]).parent / "manifest.json"
        (root / "cache" / "jars" / manifest.parent.name).mkdir(parents=True)
        shutil.copy(manifest, root / "cache" / "jars" / manifest.parent.name)
        wanted = [f"onnxruntime-gpu=={args.onnxruntime_gpu}"] + [
            w.format(pydantic=pydantic.VERSION, pydantic_core=pydantic_core.__version__) for w in WHEELS]
        for wheel in pip_wheels(wanted, args.python, Path(tmp) / "wheels"):
            with zipfile.ZipFile(wheel) as z:
                z.extractall(site)
        for rel in ("web/weborganizer_dev.jsonl.gz", "models/minilm_l6_v2/tokenizer.json"):
            if (shared / rel).is_file():
                (root / "shared" / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(shared / rel, root / "shared" / "data" / rel)
        stream = Path(tmp) / "bundle.tar.xz"
        subprocess.run(f"tar -C {root} -cf - . | xz -T0 -6 > {stream}", shell=True, check=True)
        pieces = split(stream, out, int(args.piece_mb * 1_000_000))
    first = out / "piece-00"
    (first / "setup.sh").write_text(SETUP)
    return pieces


def split(stream: Path, out: Path, size: int) -> list[Path]:
    """``stream`` cut into ``bundle.tar.xz.NN`` files, one per ``piece-NN`` folder (the first keeps room for scripts)."""
    folders = []
    with stream.open("rb") as f:
        i = 0
        while chunk := f.read(size - (100_000 if i == 0 else 0)):
            folder = out / f"piece-{i:02d}"
            folder.mkdir()
            (folder / f"bundle.tar.xz.{i:02d}").write_bytes(chunk)
            folders.append(folder)
            i += 1
    return folders


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_bundle", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for piece-00 ... piece-NN (replaced)")
    p.add_argument("--rezip", metavar="ROOT", help="on the GPU machine (setup.sh does it): pack the unpacked jars again")
    p.add_argument("--piece-mb", type=float, default=60.0, help="most MB in one piece folder (default 60)")
    p.add_argument("--python", default="3.12", help="the GPU machine's Python, for the compiled wheels (default 3.12)")
    p.add_argument("--onnxruntime-gpu", default="1.31.1", help="onnxruntime-gpu version (1.31.1: CUDA 13, as torch cu130)")
    args = p.parse_args(argv)
    if args.rezip:
        print(f"rezipped {rezip_all(Path(args.rezip))} jars")
        return 0
    if not args.out:
        p.error("--out is required to build a bundle")
    pieces = build(args)
    total = sum(f.stat().st_size for d in pieces for f in d.iterdir())
    print(f"{len(pieces)} pieces, {total / 1e6:.0f} MB, in {Path(pieces[0]).parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env bash
# Submit one quadmix-spark stage with spark-submit: standalone, YARN, Kubernetes or local.
#
#   deploy/spark-submit/submit.sh <stage> [submit options] [--] [quadmix options...]
#
# Submit options (before the quadmix options; `--` ends them explicitly):
#   --target T         standalone (default) | yarn | k8s | local: reads <T>.conf beside this script
#   --master URL       overrides spark.master of the target file
#   --deploy-mode M    client | cluster (default: spark.submit.deployMode of the target file, else client)
#   --python-env E     packed (default): build and ship the packed environment (below);
#                      local: driver and executors run this machine's interpreter ($QUADMIX_PYTHON, default
#                      .venv/bin/python), for a loopback cluster or nodes sharing that path;
#                      none: ship nothing (an image or your --conf spark.pyspark.python provides Python)
#   --local-python     the same as --python-env local
#   --gpu / --no-gpu   force the GPU settings (gpu.conf, gpu-<target>.conf) on or off; default: on for
#                      the GPU stages ($QUADMIX_GPU_STAGES, default "annotate proxy evaluate")
#   --delta-packages   resolve Delta with --packages on the cluster instead of shipping the cached jars
#   --conf K=V         extra Spark conf (repeatable; wins over the files)
#   --properties FILE  extra spark-defaults style file (repeatable; after the target files)
#   --print            print the spark-submit command and exit (builds nothing)
#   --build-env        build the packed environment, print its path and exit (e.g. to upload it once)
#   -h, --help
# Everything else is passed to jobs/<stage>.py, i.e. `quadmix <stage>` options: -c FILE, --set k=v, ...
#
# The packed environment: a virtual environment with requirements/lock.txt installed (built once per
# lock-file hash and Python version, under $QUADMIX_CACHE/spark-submit), plus the wheel of this checkout,
# packed with venv-pack into env-<lock>-<wheel>.tar.gz and shipped as `--archives ...#environment`.
# Executors run ./environment/bin/python. venv-pack does not copy the interpreter itself: the nodes need
# the same Python at the same prefix, or set QUADMIX_PACK_PYTHON_PREFIX to the nodes' prefix (e.g. /usr).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PY="${QUADMIX_PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"   # absolute, not resolved through the venv symlink
GPU_STAGES=" ${QUADMIX_GPU_STAGES:-annotate proxy evaluate} "
CACHE="${QUADMIX_CACHE:-$HOME/.cache/quadmix-spark}/spark-submit"
BUILD="$REPO/build/spark-submit"

die() { echo "submit.sh: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0 ;; -*) die "the first argument is the stage (try --help)" ;; esac
STAGE="$1"; shift
JOB="$REPO/jobs/$STAGE.py"
if [[ ! -f "$JOB" ]]; then
  avail="$(cd "$REPO/jobs" && ls -1 *.py 2>/dev/null | sed 's/\.py$//' | tr '\n' ' ')"
  die "no stage '$STAGE' (no jobs/$STAGE.py); stages: $avail"
fi

TARGET=standalone MASTER="" DEPLOY_MODE="" PYENV=packed GPU=auto DELTA=jars PRINT=0 BUILD_ONLY=0
EXTRA_CONFS=() EXTRA_PROPS=()
while (($#)); do
  case "$1" in
    --target) TARGET="${2:?--target needs a value}"; shift 2 ;;
    --master) MASTER="${2:?--master needs a value}"; shift 2 ;;
    --deploy-mode) DEPLOY_MODE="${2:?--deploy-mode needs a value}"; shift 2 ;;
    --python-env) PYENV="${2:?--python-env needs a value}"; shift 2 ;;
    --local-python) PYENV=local; shift ;;
    --gpu) GPU=yes; shift ;;
    --no-gpu) GPU=no; shift ;;
    --delta-packages) DELTA=packages; shift ;;
    --conf) [[ "${2:-}" == *=* ]] || die "--conf needs KEY=VALUE"; EXTRA_CONFS+=("$2"); shift 2 ;;
    --properties) EXTRA_PROPS+=("${2:?--properties needs a file}"); shift 2 ;;
    --print) PRINT=1; shift ;;
    --build-env) BUILD_ONLY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
JOB_ARGS=("$@")
[[ $PYENV == packed || $PYENV == local || $PYENV == none ]] || die "--python-env must be packed, local or none"
if [[ $GPU == auto ]]; then [[ "$GPU_STAGES" == *" $STAGE "* ]] && GPU=yes || GPU=no; fi

# ------------------------------------------------------------------ confs: files in order, later wins
declare -A CONF=()
CONF_KEYS=()

# ${VAR}, ${VAR:-default}, ${VAR:?message} from the environment
expand() {
  local s="$1" out="" name op arg val
  local re='^([^$]*)\$\{([A-Za-z_][A-Za-z0-9_]*)(:[-?]([^}]*))?\}(.*)$'
  while [[ "$s" =~ $re ]]; do
    out+="${BASH_REMATCH[1]}"; name="${BASH_REMATCH[2]}"; op="${BASH_REMATCH[3]:0:2}"; arg="${BASH_REMATCH[4]}"
    s="${BASH_REMATCH[5]}"
    val="${!name-}"
    if [[ -z "$val" ]]; then
      case "$op" in
        :-) val="$arg" ;;
        :?) die "$name is not set: ${arg:-required by the $TARGET settings}" ;;
      esac
    fi
    out+="$val"
  done
  printf '%s' "$out$s"
}

set_conf() {
  [[ -v "CONF[$1]" ]] || CONF_KEYS+=("$1")
  CONF["$1"]="$2"
}

set_default() {  # only where no file and no --conf set it
  [[ -v "CONF[$1]" ]] || set_conf "$1" "$2"
}

read_conf_file() {
  local file="$1" line key value
  [[ -f "$file" ]] || die "no such settings file: $file"
  while IFS= read -r line || [[ -n "$line" ]]; do
    line="${line%%$'\r'}"
    [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
    [[ "$line" =~ ^[[:space:]]*([^[:space:]=]+)[[:space:]=]+(.*[^[:space:]])[[:space:]]*$ ]] || die "$file: cannot read line: $line"
    key="${BASH_REMATCH[1]}"; value="$(expand "${BASH_REMATCH[2]}")"
    set_conf "$key" "$value"
  done < "$file"
}

[[ -f "$HERE/$TARGET.conf" ]] || die "unknown target '$TARGET' (no $HERE/$TARGET.conf)"
read_conf_file "$HERE/common.conf"
read_conf_file "$HERE/$TARGET.conf"
if [[ $GPU == yes ]]; then
  read_conf_file "$HERE/gpu.conf"
  [[ -f "$HERE/gpu-$TARGET.conf" ]] && read_conf_file "$HERE/gpu-$TARGET.conf"
fi
for f in "${EXTRA_PROPS[@]}"; do read_conf_file "$f"; done
for kv in "${EXTRA_CONFS[@]}"; do set_conf "${kv%%=*}" "${kv#*=}"; done
[[ -n "$MASTER" ]] && set_conf spark.master "$MASTER"
[[ -n "$DEPLOY_MODE" ]] && set_conf spark.submit.deployMode "$DEPLOY_MODE"
[[ -v "CONF[spark.master]" && -n "${CONF[spark.master]}" ]] || die "no master: pass --master or set spark.master in $TARGET.conf"
MODE="${CONF[spark.submit.deployMode]:-client}"
[[ $MODE == client || $MODE == cluster ]] || die "spark.submit.deployMode must be client or cluster, not '$MODE'"

# ------------------------------------------------------------------ Python environment
ARCHIVES=() FILES=()
sha() { sha256sum "$@" | cut -c1-12; }

build_wheel() {  # -> prints the wheel path; same sources give the same bytes (fixed timestamps)
  local out="$BUILD/wheel"
  rm -rf "$out"; mkdir -p "$out" "$BUILD"
  if ! (cd "$REPO" && SOURCE_DATE_EPOCH=315532800 "$PY" -m pip wheel . --no-deps --quiet --wheel-dir "$out" \
        > "$BUILD/wheel.log" 2>&1); then
    cat "$BUILD/wheel.log" >&2; die "building the wheel failed"
  fi
  ls "$out"/*.whl
}

build_packed_env() {  # -> prints the archive path
  local pyver lock_hash base wheel wheel_hash archive tmp
  pyver="$("$PY" -c 'import sys; print("py%d%d" % sys.version_info[:2])')"
  lock_hash="$(sha "$REPO/requirements/lock.txt")"
  base="$CACHE/venv-$lock_hash-$pyver"
  if [[ ! -f "$base/.complete" ]]; then  # once per lock file: the pinned packages, no resolution
    echo "submit.sh: building the environment $base from requirements/lock.txt (once per lock file)" >&2
    rm -rf "$base"; mkdir -p "$CACHE"
    "$PY" -m venv "$base" >&2
    "$base/bin/python" -m pip install --quiet --no-deps -r "$REPO/requirements/lock.txt" >&2
    "$base/bin/python" -m pip install --quiet --no-deps venv-pack==0.2.0 >&2
    touch "$base/.complete"
  fi
  wheel="$(build_wheel)"
  wheel_hash="$(sha "$wheel")"
  archive="$CACHE/env-$lock_hash-$pyver-$wheel_hash.tar.gz"
  if [[ ! -f "$archive" ]]; then
    echo "submit.sh: packing $archive" >&2
    "$base/bin/python" -m pip install --quiet --no-deps --force-reinstall "$wheel" >&2
    rm -f "$CACHE/env-$lock_hash-$pyver-"*.tar.gz  # older builds of this checkout
    tmp="$archive.tmp.tar.gz"
    # pyspark's jars are the JVM side: every node already has Spark, the executors only need its Python.
    "$base/bin/venv-pack" --quiet --force --prefix "$base" --output "$tmp" \
      --exclude 'lib/python*/site-packages/pyspark/jars/*' --exclude '*.pyc' \
      ${QUADMIX_PACK_PYTHON_PREFIX:+--python-prefix "$QUADMIX_PACK_PYTHON_PREFIX"} >&2
    mv "$tmp" "$archive"
  fi
  printf '%s' "$archive"
}

if (( BUILD_ONLY )); then build_packed_env; echo; exit 0; fi

case $PYENV in
  local)
    set_default spark.pyspark.python "$PY"
    set_default spark.pyspark.driver.python "$PY"
    ;;
  packed)
    if (( PRINT )); then ARCHIVE="$CACHE/env-<lock>-<wheel>.tar.gz"; else ARCHIVE="$(build_packed_env)"; fi
    ARCHIVES+=("$ARCHIVE#environment")
    set_default spark.pyspark.python ./environment/bin/python
    if [[ $MODE == cluster ]]; then
      set_default spark.pyspark.driver.python ./environment/bin/python
      [[ "${CONF[spark.master]}" == yarn* ]] && set_default spark.yarn.appMasterEnv.PYSPARK_PYTHON ./environment/bin/python
    else
      set_default spark.pyspark.driver.python "$PY"
    fi
    ;;
esac

# ------------------------------------------------------------------ Delta Lake jars
DELTA_ARGS=()
if [[ $DELTA == packages ]]; then
  DELTA_ARGS=(--packages "$("$PY" -c 'from quadmix_spark.core.jars import DELTA_PACKAGE; print(DELTA_PACKAGE)')")
elif (( PRINT )); then
  DELTA_ARGS=(--jars '$(python -m quadmix_spark.core.jars --submit-jars)')
else
  DELTA_ARGS=(--jars "$("$PY" -m quadmix_spark.core.jars --submit-jars | tail -n 1)")
fi

# ------------------------------------------------------------------ GPU discovery script, config files
# a relative discovery script is found in the executor's working directory, where --files land (YARN)
[[ "${CONF[spark.executor.resource.gpu.discoveryScript]:-}" == ./getGpusResources.sh ]] && FILES+=("$HERE/getGpusResources.sh")
if [[ $MODE == cluster ]]; then  # the driver runs on the cluster: ship -c files, name them by basename
  for ((i = 0; i < ${#JOB_ARGS[@]}; i++)); do
    if [[ "${JOB_ARGS[i]}" == -c || "${JOB_ARGS[i]}" == --config ]] && ((i + 1 < ${#JOB_ARGS[@]})); then
      FILES+=("${JOB_ARGS[i+1]}"); JOB_ARGS[i+1]="$(basename "${JOB_ARGS[i+1]}")"
    fi
  done
fi

# ------------------------------------------------------------------ the command
CMD=("$PY" -c 'import os, pyspark, sys; os.execv(os.path.join(os.path.dirname(pyspark.__file__), "bin", "spark-submit"), ["spark-submit", *sys.argv[1:]])')
SUBMIT="$(dirname "$PY")/spark-submit"
[[ -x "$SUBMIT" ]] && CMD=("$SUBMIT")
CMD+=(--name "quadmix-$STAGE" "${DELTA_ARGS[@]}")
((${#ARCHIVES[@]})) && CMD+=(--archives "$(IFS=,; echo "${ARCHIVES[*]}")")
((${#FILES[@]})) && CMD+=(--files "$(IFS=,; echo "${FILES[*]}")")
for key in "${CONF_KEYS[@]}"; do CMD+=(--conf "$key=${CONF[$key]}"); done
CMD+=("$JOB" "${JOB_ARGS[@]}")

if (( PRINT )); then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
if [[ $MODE == client && $PYENV != none ]]; then
  export PYSPARK_PYTHON="${CONF[spark.pyspark.python]:-}" PYSPARK_DRIVER_PYTHON="${CONF[spark.pyspark.driver.python]:-}"
fi
if [[ "${CONF[spark.master]}" == local* || "${CONF[spark.master]}" == spark://127.* || "${CONF[spark.master]}" == spark://localhost* ]]; then
  export SPARK_LOCAL_IP="${SPARK_LOCAL_IP:-127.0.0.1}"
fi
exec "${CMD[@]}"

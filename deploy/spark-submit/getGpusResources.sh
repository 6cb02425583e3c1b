#!/usr/bin/env bash
# Spark GPU resource discovery: prints {"name": "gpu", "addresses": [...]} for the GPUs this node (or
# this container) sees, which is what spark.{executor,worker}.resource.gpu.discoveryScript must print.
#
# Addresses come from, in order:
#   QUADMIX_GPU_ADDRESSES   comma-separated indexes, e.g. "0,1" (to pin or restrict by hand)
#   nvidia-smi              the index of every GPU it lists
# With no GPU found it prints the reason on stderr and exits 1, so the executor fails with that message
# instead of starting without the GPUs it was asked to have.
set -euo pipefail

name="${QUADMIX_GPU_RESOURCE_NAME:-gpu}"
if [[ -n "${QUADMIX_GPU_ADDRESSES:-}" ]]; then
  raw="${QUADMIX_GPU_ADDRESSES//,/$'\n'}"
elif command -v nvidia-smi >/dev/null 2>&1; then
  if ! raw="$(nvidia-smi --query-gpu=index --format=csv,noheader 2>&1)"; then
    echo "getGpusResources.sh: nvidia-smi failed: $raw" >&2
    exit 1
  fi
else
  echo "getGpusResources.sh: no nvidia-smi on $(hostname) and QUADMIX_GPU_ADDRESSES is not set" >&2
  exit 1
fi

addresses=()
while IFS= read -r line; do
  line="${line//[[:space:]]/}"
  [[ -z "$line" ]] && continue
  [[ "$line" =~ ^[0-9]+$ ]] || { echo "getGpusResources.sh: not a GPU index: '$line'" >&2; exit 1; }
  addresses+=("\"$line\"")
done <<< "$raw"
if ((${#addresses[@]} == 0)); then
  echo "getGpusResources.sh: no GPU found on $(hostname)" >&2
  exit 1
fi
printf '{"name": "%s", "addresses": [%s]}\n' "$name" "$(IFS=,; echo "${addresses[*]}" | sed 's/,/, /g')"

# Sourced by the device scripts: $OUT made, the repo on PYTHONPATH, step() and with_ray().
# step NAME SECONDS COMMAND...: runs COMMAND bounded in time, its log in $OUT/NAME.log, then prints
# its exit status and the log's last ${TAIL:-30} lines (Triton's warnings left out).
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
step() {
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "=== $name: exit $?"
  grep -v "Warning\|warn(" "$OUT/$name.log" | tail -n "${TAIL:-30}"
}
# with_ray: Ray Serve and its dependencies from the carried .raybundle (../shared/device/README.md)
# unpacked to /tmp/site and put first on PYTHONPATH and PATH.
with_ray() {
  mkdir -p /tmp/site && tar -xJf .raybundle/ray-serve-py312.tar.xz -C /tmp/site || return 1
  export PYTHONPATH="/tmp/site:$PYTHONPATH" PATH="/tmp/site/bin:$PATH"
}

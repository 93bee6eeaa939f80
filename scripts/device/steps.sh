# Sourced by the device scripts: $OUT made, the repo on PYTHONPATH, and step().
# step NAME SECONDS COMMAND...: runs COMMAND bounded in time, its log in $OUT/NAME.log, then prints
# its exit status and the log's last ${TAIL:-30} lines (Triton's warnings left out).
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:-$PWD}" PYTHONUNBUFFERED=1
step() {
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "=== $name: exit $?"
  grep -v "Warning\|warn(" "$OUT/$name.log" | tail -n "${TAIL:-30}"
}

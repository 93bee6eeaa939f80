# Sourced by the device scripts: $OUT made, the repo on PYTHONPATH, step(), with_ray(), w3_report(), w2_report(),
# preload_ab() and ab_winner().
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
# w3_report SECONDS MODES: W3 of MODES (the report's command) into $OUT/w3.json, then each mode's
# tok/s, step and graph times and first greedy tokens.
w3_report() {
  TAIL=24 step w3 "$1" python -m bench.quant --modes "$2" --async-scheduling on --ppl-modes none --repeats 2 \
    --profile --json "$OUT/w3.json"
  python - "$OUT/w3.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for k, v in d["speed"].items():
    print(k, round(v["tok_s"], 1), "step", round(v["profile"]["wall_ms_per_step"], 3), "graph",
          round(v["profile"]["graph_replay_ms_per_step"], 3), "first tokens", v["first_tokens"])
PY
}
# w2_report SECONDS TAIL: the W2 report run (levels ${LEVELS:-16,64,256}, ${ROUNDS:-2} rounds, each
# interleaved with the direct engine) into $OUT/w2.json and w2.log, then the last TAIL lines of its
# report without Ray's log lines. Needs with_ray first.
w2_report() {
  timeout "$1" python bench/serve_throughput.py --concurrency "${LEVELS:-16,64,256}" --interleave --rounds "${ROUNDS:-2}" \
    --serve-set ingress_direct_http.port=18000 --json "$OUT/w2.json" >"$OUT/w2.log" 2>&1
  echo "=== w2: exit $?"
  grep -v "INFO\|WARNING\|raylet\|nanobind\|leaked\|^\s*$" "$OUT/w2.log" | tail -n "$2"
}
# preload_ab SECONDS: the decode graph's same-process A/B (${AB_ROUNDS:-2} rounds) of decode attention's
# preload variants and the int4 products without split-K, beside the shipped graph, into $OUT/graph-ab.json.
preload_ab() {
  TAIL=24 step graph-ab "$1" python -m bench.decode_graph_ab --rounds "${AB_ROUNDS:-2}" \
    --variants attn-preload,attn-1x256,attn-wide,mma-no-split --json "$OUT/graph-ab.json"
}
# ab_winner: the variant of $OUT/graph-ab.json with the shortest graph if it beat the shipped one, else "shipped".
ab_winner() {
  python - "$OUT/graph-ab.json" <<'PY'
import json, sys
ms = json.load(open(sys.argv[1]))["ms_per_replay"]
tried = {v: t for v, t in ms.items() if v != "shipped"}
best = min(tried, key=tried.get) if tried else None
print(best if best and tried[best] < ms["shipped"] else "shipped")
PY
}

#!/usr/bin/env bash
# Samples one Ray Serve replica with py-spy once it exists (run in the background beside a bench):
#   scripts/device/spy.sh PATTERN DELAY_S DURATION_S OUT_FILE
# PATTERN: the replica's process title after "ray::", e.g. 'ServeReplica:llm:LLMServer'; py-spy must be
# on PATH (carried as a wheel, as the device README says). Writes collapsed stacks (py-spy -f raw),
# each under its thread.
set -u
pattern="$1" delay="$2" duration="$3" out="$4"
# Anchored at Ray's title, so no shell whose command line holds the pattern matches.
re="^ray::${pattern}"
for _ in $(seq 300); do
  pid=$(pgrep -f "$re" | head -1)
  [ -n "$pid" ] && break
  sleep 1
done
[ -n "${pid:-}" ] || { echo "spy.sh: no process matches $pattern" >&2; exit 1; }
sleep "$delay"
py-spy record -p "$pid" -d "$duration" -r 100 -f raw --threads --nonblocking -o "$out" 2>&1 | tail -n 3
echo "spy.sh: $pattern (pid $pid) sampled for $duration s into $out"

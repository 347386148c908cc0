# Sourced by scripts/reproduce.sh and scripts/reproduce_cpu.sh: `run NAME OVERRIDES...`, one ddrun distill run in
# "$OUT/NAME" with its log appended to "$OUT/NAME.log" after a dated header. The caller sets OUT, ONLY
# (" NAME... ", or "  " for all), DDRUN, COMMON (overrides of every run) and RESULT (the grep -E pattern of the log
# lines printed after a finished run). From the environment:
#   REPRODUCE_LIMIT_S=N: this call's wall time in all. A run still going at the deadline gets SIGTERM (ddrun saves
#     its checkpoint at the next iteration boundary and stops), the runs after it are left for a later call.
#   REPRODUCE_SET="overrides...": appended to every run (e.g. the scripts' own tests at tiny budgets).
# A finished run (synthetic.pt) is skipped; a run cut at DEADLINE keeps its checkpoint and the same command
# continues it; a failed run prints its log's path and returns 1.
DEADLINE=${REPRODUCE_LIMIT_S:+$(( $(date +%s) + REPRODUCE_LIMIT_S ))}
read -r -a EXTRA <<<"${REPRODUCE_SET:-}"
run() {
  local name=$1 left rc; shift
  if [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $name "* ]]; then return; fi
  if [ -f "$OUT/$name/synthetic.pt" ]; then echo "== $name: done already"; return; fi
  local cmd=($DDRUN distill $COMMON "$@" "${EXTRA[@]}" hydra.run.dir="$OUT/$name")
  if [ -n "$DEADLINE" ]; then
    left=$(( DEADLINE - $(date +%s) ))
    if [ "$left" -le 0 ]; then echo "== $name: left for a later call (REPRODUCE_LIMIT_S=$REPRODUCE_LIMIT_S spent)"; return; fi
    cmd=(timeout -s TERM -k 120 "$left" "${cmd[@]}")
  fi
  echo "== $name: ${cmd[*]}"
  echo "== $(date '+%F %T') ${cmd[*]}" >> "$OUT/$name.log"
  local start; start=$(wc -l <"$OUT/$name.log")
  rc=0; "${cmd[@]}" >> "$OUT/$name.log" 2>&1 || rc=$?
  if [ -n "$DEADLINE" ] && { [ "$rc" = 124 ] || [ "$rc" = 137 ]; }; then
    local at; at=$(tail -n +"$((start + 1))" "$OUT/$name.log" | grep -oE "stopped by SIGTERM at iteration [0-9]+" | tail -1 | grep -oE "[0-9]+$" || true)
    if [ -n "$at" ]; then echo "   time limit: stopped at iteration $at, checkpoint in $OUT/$name; the same command continues it"
    else echo "   time limit: stopped before its first checkpoint of this call (see $OUT/$name.log); the same command continues it"; fi
    return
  fi
  [ "$rc" = 0 ] || { echo "   failed (exit $rc), see $OUT/$name.log"; return 1; }
  tail -n +"$((start + 1))" "$OUT/$name.log" | grep -E "$RESULT" | tail -3
}

# Sourced by the device scripts (gpu_bench_run.sh, gpu_capacity_run.sh).
# stage NAME SECONDS COMMAND...: run one stage capped in wall-clock time (TERM at
# the limit, KILL STAGE_KILL_AFTER seconds later), its output in
# $STAGE_DIR/NAME.log, one status line in $STAGE_DIR/status.txt, so a stage cut
# short keeps what it wrote and the next stage still runs.
stage() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout --signal=TERM --kill-after="${STAGE_KILL_AFTER:-20}" "$limit" "$@" > "$STAGE_DIR/$name.log" 2>&1
    echo "$name: exit $? after $((SECONDS - t0)) s (at $SECONDS s)" | tee -a "$STAGE_DIR/status.txt"
}

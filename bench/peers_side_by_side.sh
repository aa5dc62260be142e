#!/usr/bin/env bash
# Side by side with the peers (issue 19), interleaved round by round: every system once per round,
# the order within a pair alternating between rounds, each result tagged with its round (RUN_TAG),
# so that common/ratios.py can take Docket / peer ratios within a round.
#
# usage: PEERS=/tmp/peers ROUNDS=5 bash bench/peers_side_by_side.sh
#   PEERS   an installed copy of the peers harness (cp -r ../shared/peers /tmp/peers; common/setup.sh)
#   ROUNDS  rounds (default 5); SUB results sub-directory (default results_2026-12-02)
#   DOCKET_SRC  the Docket checkout (default: this script's); the docket peer is NOT rebuilt
#   ONLY    optional space-separated subset of: sqlite-w1 pg-w1 pg-w2 sqlite-w2
# Then: cd $PEERS && python3 common/ratios.py . $SUB; python3 common/aggregate.py . $SUB
# The machine's load average before each run goes to $PEERS/load_$SUB.log.
set -uo pipefail
PEERS=${PEERS:-/tmp/peers}
ROUNDS=${ROUNDS:-5}
SUB=${SUB:-results_2026-12-02}
ONLY=${ONLY:-"sqlite-w1 pg-w1 pg-w2 sqlite-w2"}
# the Docket checkout the docket peer was built against (this script's checkout by default)
export DOCKET_SRC=${DOCKET_SRC:-"$(cd "$(dirname "$0")/.." && pwd)"}
export DOCKET_NO_BUILD=1 REPS=1
cd "$PEERS"
LOAD="$PEERS/load_$SUB.log"

one() { # peer backend W tag
  local peer=$1 backend=$2 w=$3 tag=$4
  echo "$tag $peer $backend $w load $(cut -d' ' -f1-3 /proc/loadavg) at $(date +%T)" | tee -a "$LOAD" >&2
  RESULTS="$PEERS/$peer/$SUB" RUN_TAG="$tag" "$peer/run.sh" "$w" "$backend" >/dev/null
}

pair() { # round  docket-backend  peer  peer-backend  W
  local r=$1 db=$2 p=$3 pb=$4 w=$5 tag="2026-12-02/r$1"
  if [ $((r % 2)) = 1 ]; then
    one docket "$db" "$w" "$tag"; one "$p" "$pb" "$w" "$tag"
  else
    one "$p" "$pb" "$w" "$tag"; one docket "$db" "$w" "$tag"
  fi
}

for r in $(seq 1 "$ROUNDS"); do
  for g in $ONLY; do
    case $g in
      sqlite-w1) pair "$r" sqlite apalis sqlite W1 ;;
      pg-w1) pair "$r" pg graphile-worker pg W1 ;;
      pg-w2) pair "$r" pg graphile-worker pg W2 ;;
      sqlite-w2) pair "$r" sqlite huey sqlite W2 ;;
      *) echo "unknown group $g" >&2; exit 2 ;;
    esac
  done
done
echo "done: $ROUNDS rounds into */$SUB" >&2

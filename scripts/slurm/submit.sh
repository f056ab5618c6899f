#!/bin/bash
# Submit bidsdl on SLURM: the participant array (one task per participant), then the group job,
# which runs only when every participant task succeeded.
#
#   BIDS_DIR=/data/bids OUTPUT_DIR=/scratch/derivatives SIF=/containers/bidsdl-0.1.0.sif \
#   GROUP_ARGS="--target diagnosis --positive-class AD" scripts/slurm/submit.sh [sbatch options]
#
# Environment: as in participant_array.sbatch; PARTICIPANT_ARGS and GROUP_ARGS are the extra
# bidsdl options of each level (e.g. PARTICIPANT_ARGS="--participant-label 01 02"; the array
# is sized from the same selection). Options after the script name go to both sbatch calls
# (e.g. --account=lab --partition=short). Prints the two job IDs.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

: "${BIDS_DIR:?export BIDS_DIR}"
: "${OUTPUT_DIR:?export OUTPUT_DIR}"
BIDS_DIR=$(realpath "$BIDS_DIR"); OUTPUT_DIR=$(realpath -m "$OUTPUT_DIR")
[[ -n ${WORK_DIR:-} ]] && WORK_DIR=$(realpath -m "$WORK_DIR")
export BIDS_DIR OUTPUT_DIR WORK_DIR SIF BIDSDL

# The listing indexes BIDS_DIR once (WORK_DIR/bids_index, or --bids-database-dir in PARTICIPANT_ARGS): every
# array task then reuses that index and reads only its own participant's files, instead of the whole dataset.
mkdir -p "$OUTPUT_DIR" ${WORK_DIR:+"$WORK_DIR"}
binds="-B $BIDS_DIR:$BIDS_DIR:ro -B $OUTPUT_DIR${WORK_DIR:+ -B $WORK_DIR}"
BIDSDL_HERE=${BIDSDL:-"singularity run --cleanenv $binds ${SIF:-bidsdl.sif}"}
# shellcheck disable=SC2086
participants=$($BIDSDL_HERE "$BIDS_DIR" "$OUTPUT_DIR" participant --list-participants ${WORK_DIR:+-w "$WORK_DIR"} \
    ${PARTICIPANT_ARGS:-})
n=$(printf '%s\n' "$participants" | grep -c .) || true
if (( n == 0 )); then
  echo "submit.sh: no participants selected in $BIDS_DIR; nothing submitted." >&2
  exit 18
fi
mkdir -p "$OUTPUT_DIR/logs/slurm"

array_id=$(BIDSDL_ARGS=${PARTICIPANT_ARGS:-} sbatch --parsable --array="0-$((n - 1))" \
    --output="$OUTPUT_DIR/logs/slurm/participant-%A_%a.log" "$@" "$here/participant_array.sbatch")
array_id=${array_id%%;*}
group_id=$(BIDSDL_ARGS=${GROUP_ARGS:-} sbatch --parsable --dependency="afterok:$array_id" \
    --kill-on-invalid-dep=yes --output="$OUTPUT_DIR/logs/slurm/group-%j.log" "$@" "$here/group.sbatch")
group_id=${group_id%%;*}

echo "participant array: $array_id ($n task(s): ${participants//$'\n'/ })" >&2
echo "group job:         $group_id (runs only if every participant task succeeds)" >&2
echo "$array_id $group_id"

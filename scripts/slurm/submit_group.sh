#!/bin/bash
# Submit bidsdl's group level on SLURM with the folds of the cross-validation in parallel: one array
# task per fold (group --fold K), then the assembly job (the same command without --fold), which runs
# only when every fold succeeded and trains nothing again: it reuses the finished folds (same settings
# and splits, checked by hash), assembles the ensemble, evaluates it on the test set and writes the
# package and the reports. Run it after the participant level (submit.sh).
#
#   BIDS_DIR=/data/bids OUTPUT_DIR=/scratch/derivatives SIF=/containers/bidsdl-0.1.0.sif N_FOLDS=5 \
#   GROUP_ARGS="--target diagnosis --positive-class AD" scripts/slurm/submit_group.sh [sbatch options]
#
# Environment: as in group.sbatch; N_FOLDS (default 5) is passed as --n-folds, so leave --n-folds out of
# GROUP_ARGS. Options after the script name go to both sbatch calls (e.g. --account=lab, or a GPU's
# --gres=gpu:1 --partition=gpu with "--nv" in BIDSDL). A failed fold task keeps the assembly from
# starting; re-submitting trains only the folds that did not finish. Prints the two job IDs.
#
# With N_TRIALS=N, the array runs a hyperparameter search instead: one task per trial (group --search N
# --trial K, every fold of that trial), then the job that trains nothing again: it takes the best trial by its
# validation folds, evaluates it once on the test set and writes the package and reports.
#
# With N_OUTER=K, a nested cross-validation: one task per outer fold (group --outer-folds K --outer-fold k: that
# outer fold's whole study, its N_FOLDS inner folds one after another), then the job that pools them (every
# participant tested once), trains the model for later use on everyone and writes the reports. Without N_OUTER the
# design is one held-out test set (--outer-folds 0), whatever the cohort's size: the command line's default (nested
# below 300 participants) would differ between the array and the assembly. Leave --outer-folds out of GROUP_ARGS.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

: "${BIDS_DIR:?export BIDS_DIR}"
: "${OUTPUT_DIR:?export OUTPUT_DIR}"
n_folds=${N_FOLDS:-5}
if [[ " ${GROUP_ARGS:-} " == *" --n-folds "* ]]; then
  echo "submit_group.sh: set N_FOLDS instead of --n-folds in GROUP_ARGS." >&2
  exit 64
fi
BIDS_DIR=$(realpath "$BIDS_DIR"); OUTPUT_DIR=$(realpath -m "$OUTPUT_DIR")
[[ -n ${WORK_DIR:-} ]] && WORK_DIR=$(realpath -m "$WORK_DIR")
export BIDS_DIR OUTPUT_DIR WORK_DIR SIF BIDSDL
mkdir -p "$OUTPUT_DIR/logs/slurm"
# one held-out test set (--outer-folds 0) unless N_OUTER asks for nested cross-validation: the array parts the
# work one way, and the assembly must run the same design (the command line's default nests below 300 participants)
args="${GROUP_ARGS:-} --n-folds $n_folds --outer-folds 0"
tasks=$n_folds what=fold
if [[ " ${GROUP_ARGS:-} " == *" --outer-folds "* ]]; then
  echo "submit_group.sh: set N_OUTER instead of --outer-folds in GROUP_ARGS." >&2
  exit 64
fi
if [[ -n ${N_TRIALS:-} && -n ${N_OUTER:-} ]]; then
  echo "submit_group.sh: N_TRIALS and N_OUTER do not combine (search on one test set, then nest the chosen settings)." >&2
  exit 64
fi
if [[ -n ${N_TRIALS:-} ]]; then
  args="$args --search $N_TRIALS" tasks=$N_TRIALS what=trial
  export BIDSDL_ARRAY_OPTION=--trial
elif [[ -n ${N_OUTER:-} ]]; then
  args="${GROUP_ARGS:-} --n-folds $n_folds --outer-folds $N_OUTER" tasks=$N_OUTER what=outer
  export BIDSDL_ARRAY_OPTION=--outer-fold
fi

folds_id=$(BIDSDL_ARGS=$args sbatch --parsable --array="0-$((tasks - 1))" --job-name="bidsdl-$what" \
    --output="$OUTPUT_DIR/logs/slurm/group-$what-%A_%a.log" "$@" "$here/group.sbatch")
folds_id=${folds_id%%;*}
assembly_id=$(BIDSDL_ARGS=$args BIDSDL_ARRAY_OPTION='' sbatch --parsable --dependency="afterok:$folds_id" \
    --kill-on-invalid-dep=yes --output="$OUTPUT_DIR/logs/slurm/group-%j.log" "$@" "$here/group.sbatch")
assembly_id=${assembly_id%%;*}

echo "$what array:   $folds_id ($tasks task(s), one $what each)" >&2
echo "assembly job: $assembly_id (runs only if every fold succeeds)" >&2
echo "$folds_id $assembly_id"

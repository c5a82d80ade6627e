#!/usr/bin/env bash
# A model trained again from its seed, beside its first run: validation perplexity epoch by epoch.
set -euo pipefail

usage() {
  cat << 'EOF'
usage: scripts/rerun_table.sh NAME FIRST_RUN_LOG [EPOCH=PPL ...]

Writes RESULTS/sensitivity/NAME-rerun.tsv: for each epoch, the first run's validation perplexity
(from FIRST_RUN_LOG, a fairseq-train log or its kept end-of-epoch lines, usually
RESULTS/superseded/DATASET.NAME.<sha>.log), the rerun's (from RESULTS/models/DATASET.NAME.log, kept
by scripts/ton2022.sh) and their relative difference. EPOCH=PPL adds first-run epochs that no kept
log holds. Environment: RESULTS (default results/ton2022-small), DATASET (default wikitext-2).
EOF
}

case ${1:-} in -h | --help) usage; exit 0 ;; esac
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
[ $# -ge 2 ] || usage_error "NAME and FIRST_RUN_LOG are required"
name=$1 first_log=$2
shift 2
results=${RESULTS:-results/ton2022-small} dataset=${DATASET:-wikitext-2}
rerun_log=$results/models/$dataset.$name.log
[ -f "$first_log" ] || usage_error "FIRST_RUN_LOG $first_log does not exist"
[ -f "$rerun_log" ] || usage_error "$rerun_log does not exist: the rerun of $name is not finished (scripts/ton2022.sh keeps it)"
for pair in "$@"; do
  [[ $pair =~ ^[0-9]+=[0-9]+(\.[0-9]+)?$ ]] || usage_error "'$pair' is not EPOCH=PPL (e.g. 16=287.9)"
done
out=$results/sensitivity/$name-rerun.tsv
mkdir -p "$(dirname "$out")"
{
  printf 'epoch\tfirst_run_valid_ppl\trerun_valid_ppl\trelative_difference\n'
  {
    valid_ppls "$first_log" | sed 's/^/first /'
    for pair in "$@"; do echo "first ${pair/=/ }"; done  # after the log: these win an epoch both give
    valid_ppls "$rerun_log" | sed 's/^/rerun /'
  } | awk '{ppl[$1, $2 + 0] = $3; epochs[$2 + 0] = 1}
      END {
        for (e in epochs) {
          a = ppl["first", e]; b = ppl["rerun", e]
          printf "%d\t%s\t%s\t%s\n", e, a, b, (a != "" && b != "") ? sprintf("%+.4f", (b - a) / a) : ""
        }
      }' | sort -n
} > "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out"

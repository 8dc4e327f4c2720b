#!/bin/bash
# Functions shared by lsf/*.lsf (sourced from the repository, so also by the copy LSF
# runs). Each failure is one line naming the variable and what fits.

# load_site REPO PYTHON: SITE_* variables of configs/site/$SITE.yaml (SITE, else AADL_SITE,
# else local). A SITE_SETUP from the environment holding a file is the older form.
load_site() {
    local lines
    if [[ -n "${SITE_SETUP:-}" && -f "${SITE_SETUP}" ]]; then
        echo "SITE_SETUP=$SITE_SETUP: a file to source is now given as SETUP='source $SITE_SETUP' (or as a setup: line of configs/site/<name>.yaml)" >&2
        return 1
    fi
    lines=$(cd "$1" && "$2" -m experiments.site "${SITE:-${AADL_SITE:-local}}" --shell) || return 1
    eval "$lines"
}

# expand_seeds SPEC: "0-3,7" -> "0 1 2 3 7" (the SEEDS syntax of slurm/seed_array.sbatch).
expand_seeds() {
    local part first last seed seeds=()
    IFS=, read -r -a parts <<<"$1"
    for part in "${parts[@]}"; do
        if [[ "$part" =~ ^([0-9]+)-([0-9]+)$ ]]; then
            first=${BASH_REMATCH[1]} last=${BASH_REMATCH[2]}
            (( first <= last )) || { echo "SEEDS=$1: $part runs backwards" >&2; return 1; }
            for ((seed = first; seed <= last; seed++)); do seeds+=("$seed"); done
        elif [[ "$part" =~ ^[0-9]+$ ]]; then
            seeds+=("$part")
        else
            echo "SEEDS=$1: a list of seeds and ranges such as 0-19 or 3,7,12" >&2
            return 1
        fi
    done
    echo "${seeds[*]}"
}

# lsf_indices SPEC: the LSF array indices of the seeds (index = seed + 1; LSF starts at 1).
lsf_indices() {
    local out=() part
    IFS=, read -r -a parts <<<"$1"
    for part in "${parts[@]}"; do
        if [[ "$part" =~ ^([0-9]+)-([0-9]+)$ ]]; then
            out+=("$(( BASH_REMATCH[1] + 1 ))-$(( BASH_REMATCH[2] + 1 ))")
        else
            out+=("$(( part + 1 ))")
        fi
    done
    local IFS=,
    echo "${out[*]}"
}

# -wa warning, SIGUSR2 at the -W run limit, bkill's TERM) is passed on to each of them.
# Sets `signalled` to the last signal's name.
forward_signals() {
    local sig
    for sig in USR1 USR2 TERM INT; do
        # shellcheck disable=SC2064  # the signal's name is bound now
        trap "pass_on $sig" "$sig"
    done
}

# shellcheck disable=SC2154,SC2034  # children: the caller's pids; signalled: read by the caller
pass_on() {
    local pid
    signalled=$1
    echo "lsf: SIG$1: passing it on"
    for pid in "${children[@]+"${children[@]}"}"; do
        kill -s "$1" "$pid" 2>/dev/null || true
    done
}

# wait_for PID: its exit status, waiting again when a trapped signal interrupts the wait.
wait_for() {
    local rc=0
    while true; do
        wait "$1" && rc=0 || rc=$?
        kill -0 "$1" 2>/dev/null || break
    done
    return "$rc"
}

#!/bin/bash
# Functions shared by slurm/*.sbatch (sourced from the repository, so also by the copy
# Slurm runs). Each failure is one line naming the variable and what fits.

# slurm_seconds TIME: Slurm's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in seconds.
slurm_seconds() {
    local time=$1 days=0 h=0 m=0 s=0 rest
    if [[ "$time" == *-* ]]; then
        days=${time%%-*} rest=${time#*-}
        IFS=: read -r h m s <<<"$rest"
    else
        case "$(tr -cd : <<<"$time" | wc -c)" in
            0) m=$time ;;
            1) IFS=: read -r m s <<<"$time" ;;
            *) IFS=: read -r h m s <<<"$time" ;;
        esac
    fi
    for part in "$days" "${h:-0}" "${m:-0}" "${s:-0}"; do
        [[ "$part" =~ ^[0-9]+$ ]] || { echo "TIME=$time: not a Slurm time (minutes, MM:SS, HH:MM:SS or D-HH:MM:SS)" >&2; return 1; }
    done
    echo $(( 10#$days * 86400 + 10#${h:-0} * 3600 + 10#${m:-0} * 60 + 10#${s:-0} ))
}

# check_signal_seconds TIME SIGNAL_SECONDS: the warning must come after the job starts.
check_signal_seconds() {
    local limit
    limit=$(slurm_seconds "$1") || return 1
    [[ "$2" =~ ^[0-9]+$ ]] || { echo "SIGNAL_SECONDS=$2: a whole number of seconds" >&2; return 1; }
    if (( $2 >= limit )); then
        echo "SIGNAL_SECONDS=$2: must be less than TIME=$1 ($limit s), or the warning arrives as the job starts; e.g. SIGNAL_SECONDS=$(( limit / 4 ))" >&2
        return 1
    fi
}

# check_cpus CPUS_PER_TASK PARTITION: a request no node of the partition can hold stays
# PENDING forever (Reason=PartitionConfig) without a message; say what fits instead.
check_cpus() {
    local cpus=$1 partition=$2 most
    [[ "$cpus" =~ ^[1-9][0-9]*$ ]] || { echo "CPUS_PER_TASK=$cpus: a whole number >= 1" >&2; return 1; }
    command -v sinfo >/dev/null 2>&1 || return 0
    most=$(sinfo -h -o %c ${partition:+-p "$partition"} 2>/dev/null | tr -d '+' | sort -n | tail -n 1)
    [[ "$most" =~ ^[0-9]+$ ]] || return 0
    if (( cpus > most )); then
        echo "CPUS_PER_TASK=$cpus: the largest node of partition ${partition:-(default)} has $most CPUs; set CPUS_PER_TASK=1..$most" >&2
        return 1
    fi
}

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

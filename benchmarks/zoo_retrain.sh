#!/usr/bin/env bash
# Retrain the behaviour-policy zoo (issue 21) in the background, one worker per CPU core, resumable.
#
#   nohup benchmarks/zoo_retrain.sh /work/zoo_runs 0 hopper halfcheetah-kinematic ... > q0.log 2>&1 &
#   nohup benchmarks/zoo_retrain.sh /work/zoo_runs 1 hopper-kinematic halfcheetah ... > q1.log 2>&1 &
#   nohup benchmarks/zoo_retrain.sh /work/zoo_runs 1 ant@ant-morph ... > q1.log 2>&1 &   # fine-tune from a sibling
#
# Each worker trains its domains one after the other with `algos/sac.py` (1M steps, the default physics), pinned to
# core <core> with a single-threaded XLA, into <root>/<domain>/seed0 (keep <root> outside the repository so that no
# cleanup deletes it). Run again after an interruption: a domain with a checkpoint resumes, a finished one is
# skipped. Harvest a domain whose expert passes its bar with
#   python benchmarks/policy_zoo.py --runs <root> --domains <domain> && touch <root>/<domain>/HARVESTED
# and stop its sac.py process: the worker moves on to its next domain.
# Logs: <root>/<domain>.log. Before a session ends, `python benchmarks/zoo_carry.py --runs <root>` keeps the networks of
# the unfinished runs in the repository (benchmarks/zoo_carry/, commit it); on a machine without <root>, a domain
# carried there continues from them (sac.py --init-from). <domain>@<other> starts a domain that has neither a
# checkpoint nor a carry from <root>/<other>/seed0/checkpoint.npz (sac.py --init-from: a trained sibling's networks,
# optimiser and temperature, as the old v5 zoo's ant came from ant-morph's), else from the networks
# `zoo_carry.py --sources <other>` kept in benchmarks/zoo_carry/from/, else from scratch.
set -euo pipefail
root=$1; core=$2; shift 2
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python}"
mkdir -p "$root"
for spec in "$@"; do
  domain="${spec%@*}"; from=""; [ "$spec" != "$domain" ] && from="${spec#*@}"
  out="$root/$domain/seed0"
  # done: trained to 1M steps, or harvested into envs/policies/ (touch <root>/<domain>/HARVESTED)
  if [ -f "$out/snapshots/actor_1000000.npz" ] || [ -f "$root/$domain/HARVESTED" ]; then continue; fi
  resume=""; [ -f "$out/checkpoint.npz" ] && resume="--resume"
  # a run carried from an earlier machine (benchmarks/zoo_carry.py): continue from its networks
  [ -z "$resume" ] && [ -f "$repo/benchmarks/zoo_carry/$domain.npz" ] && resume="--init-from $repo/benchmarks/zoo_carry/$domain.npz"
  if [ -z "$resume" ] && [ -n "$from" ]; then
    if [ -f "$root/$from/seed0/checkpoint.npz" ]; then resume="--init-from $root/$from/seed0/checkpoint.npz"
    elif [ -f "$repo/benchmarks/zoo_carry/from/$from.npz" ]; then resume="--init-from $repo/benchmarks/zoo_carry/from/$from.npz"
    else echo "$domain: neither $root/$from/seed0/checkpoint.npz nor a carried $from to start from; from scratch"; fi
  fi
  XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
    taskset -c "$core" "$python" "$repo/algos/sac.py" --env "$domain" --seed 0 --out "$out" $resume \
    >> "$root/$domain.log" 2>&1 || echo "sac.py $domain stopped (exit status $?); on to the next domain"
done

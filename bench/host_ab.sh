#!/bin/bash
# Before and after in one call on the 16-core benchmark host: two trees of the project, each a
# whole bench/stack_overhead.py run of its own (Ray started and stopped per side), JSON to $OUT.
#
# Here: put trimmed trees of the two commits, each with a COMMIT file naming it, beside this
# script in the carried overlay folder, e.g.
#   for s in base:795a7a0 after:HEAD; do d=.bench-host/ab/${s%%:*}; mkdir -p $d
#     git archive ${s#*:} serve_app devstack pyproject.toml bench/cpus.py bench/loadgen.py \
#       bench/stack_overhead.py bench/sim_engine.py | tar -x -C $d
#     git rev-parse --short ${s#*:} > $d/COMMIT; done
#   cp bench/host_ab.sh .bench-host/ab/
# There (carry .bench-host): bash .bench-host/run.sh bash .bench-host/ab/host_ab.sh
# Settings by environment: SIDES, ROUTERS (6), PROCS (6), REPLICAS (4), LEVELS (256,512),
# RATES (600), HOPS (256), SIDE_S (seconds a side may take, 280); PY and SITE for a local try.
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-/tmp/host-ab}; mkdir -p "$out"
py=${PY:-python3}; site=${SITE:-/tmp/site}
echo "cores $(nproc) $($py --version) $(date -u +%T)"
# HAProxy is started through the project's launcher (splicing off), found next to the interpreter
bin=$("$py" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
[ -x "$bin/serve-app-haproxy" ] || printf '#!%s\nfrom serve_app.ingress_haproxy import main\nmain()\n' \
  "$("$py" -c 'import sys; print(sys.executable)')" > "$bin/serve-app-haproxy" && chmod +x "$bin/serve-app-haproxy"
for side in ${SIDES:-base after}; do
  tree=$here/$side
  start=$(date +%s)
  ( cd "$tree" && PYTHONPATH=$site:$tree timeout "${SIDE_S:-280}" "$py" bench/stack_overhead.py \
      --replicas "${REPLICAS:-4}" --routers "${ROUTERS:-6}" --processes "${PROCS:-6}" \
      --concurrency "${LEVELS-256,512}" --rates "${RATES-600}" --rounds 1 \
      --hop-streams "${HOPS:-256}" --requests 3 \
      --out "$out/so_16cpu_${side}.json" --commit "$(cat "$tree/COMMIT")" ) 2>&1 \
    | grep -v -i "warning\|deprecat" | tail -25
  echo "$side took $(( $(date +%s) - start )) s"
done

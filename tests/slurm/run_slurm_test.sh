#!/usr/bin/env bash
# A real one-node SLURM (Debian's slurmctld, slurmd, munge; as root), then the tiny workflow submitted through
# --workflow-profile profiles/slurm. Checks that the jobs went through sbatch and that the outputs are right.
# Usage: bash tests/slurm/run_slurm_test.sh [WORKDIR]      (make slurm-test)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-$(mktemp -d /tmp/cpmn-slurm.XXXXXX)}
mkdir -p "$work"
export PATH="$repo/.venv/bin:$PATH"

if [ "$(id -u)" != 0 ]; then echo "SKIP: the SLURM test needs root (it installs and starts slurmctld/slurmd)"; exit 0; fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
fi

host=$(hostname -s)
read -r cpus mem < <(slurmd -C | awk '/NodeName/ {for(i=1;i<=NF;i++){split($i,a,"="); if(a[1]=="CPUs")c=a[2]; if(a[1]=="RealMemory")m=a[2]}} END {print c, int(m*0.9)}')
mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm /run/munge
chown -R slurm:slurm /var/lib/slurm /var/log/slurm 2>/dev/null || true
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=ci
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=300
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
CONF

stop_slurm() {
  for f in /run/slurmd.pid /run/slurmctld.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  sleep 1; rm -f /run/slurmctld.pid /run/slurmd.pid
}
fail() {
  echo "FAIL: $*"; tail -n 40 /var/log/slurm/*.log 2>/dev/null || true; stop_slurm; exit 1
}
trap stop_slurm EXIT

pgrep -x munged >/dev/null || service munge start >/dev/null 2>&1 || munged --force
munge -n | unmunge >/dev/null || fail "munge does not work"
stop_slurm
# A throwaway cluster: no state of an earlier (killed) run, whose stale jobs would hold the node.
pkill -x slurmstepd 2>/dev/null || true
rm -rf /var/lib/slurm/slurmctld/* /var/lib/slurm/slurmd/*
slurmctld -c
slurmd
for _ in $(seq 30); do sinfo -h -o %T 2>/dev/null | grep -q idle && break; sleep 1; done
sinfo -h -o %T | grep -q idle || fail "the node did not become idle"
echo "SLURM up: $(sinfo -h -o '%P %T %c CPUs %m MB')"

cd "$repo"
start=$(date +%s)
# The test node has ${cpus} CPUs: cap the profile's per-rule cpus/memory so that every job fits on it.
timeout -k 30 1500 snakemake --workflow-profile profiles/slurm --configfile config/tiny.yaml \
  --config results="$work/results" --jobs 4 --directory "$repo" \
  --set-resources register:cpus_per_task=1 train:cpus_per_task=1 infer:cpus_per_task=1 \
  train:mem_mb=3000 infer:mem_mb=3000 --default-resources mem_mb=1500 runtime=30 cpus_per_task=1 \
  >"$work/snakemake.log" 2>&1 \
  || { tail -n 60 "$work/snakemake.log"; fail "snakemake through SLURM failed (or timed out)"; }
echo "workflow through SLURM: $(( $(date +%s) - start )) s"

# The jobs went through sbatch: the plugin logs one SLURM job id per job.
n_sbatch=$(grep -c "SLURM jobid\|external jobid" "$work/snakemake.log" || true)
[ "$n_sbatch" -ge 5 ] || { tail -n 60 "$work/snakemake.log"; fail "expected >= 5 sbatch submissions, saw $n_sbatch"; }
python3 "$repo/tests/slurm/check_outputs.py" "$work/results" || fail "outputs are not right"
echo "PASS: $n_sbatch jobs went through sbatch; outputs checked"

#!/usr/bin/env bash
# Start the services the `cluster` tests need, on loopback only, from Debian's packages:
# PostgreSQL (Optuna RDB storage) and a single-node Slurm cluster (munge + slurmctld + slurmd).
# Prints `export ...` lines for the tests: eval "$(bash .ci/services.sh)".
# Needs root (CI machines run as root); idempotent.
set -euo pipefail
log() { echo "services: $*" >&2; }

if ! command -v pg_ctlcluster >/dev/null || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  log "installing postgresql slurm-wlm munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql slurm-wlm munge >&2
fi

# --- PostgreSQL on 127.0.0.1:5432 ------------------------------------------------------------
pg_version=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h | grep -q online; then
  pg_lsclusters -h | grep -q "^$pg_version main" || pg_createcluster "$pg_version" main >&2
  pg_ctlcluster "$pg_version" main start >&2
fi
for _ in $(seq 30); do pg_isready -h 127.0.0.1 -q && break; sleep 1; done
su postgres -c "psql -tAc \"SELECT 1 FROM pg_roles WHERE rolname='cnnexp'\"" | grep -q 1 \
  || su postgres -c "psql -q -c \"CREATE ROLE cnnexp LOGIN SUPERUSER PASSWORD 'cnnexp'\"" >&2
log "postgresql $pg_version ready"
echo "export CNNEXP_TEST_POSTGRES_URL=postgresql://cnnexp:cnnexp@127.0.0.1:5432/postgres"

# --- Slurm, one node (../shared/notes/slurm-single-node.md) -----------------------------------
host=$(hostname)
if ! sinfo -h -o %t 2>/dev/null | grep -qE "idle|mix|alloc"; then
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
  chown munge:munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
  chmod 400 /etc/munge/munge.key
  pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
  munge -n | unmunge | grep -q "STATUS: *Success"
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
# Bind both daemons to their configured (loopback) addresses instead of every interface.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  pgrep -x slurmctld >/dev/null || slurmctld
  pgrep -x slurmd >/dev/null || slurmd
  for _ in $(seq 30); do sinfo -h -o %t 2>/dev/null | grep -qE "idle|mix|alloc" && break; sleep 1; done
fi
sinfo -h -o %t | grep -qE "idle|mix|alloc" && log "slurm ready ($(sinfo -h -o '%P %D %t'))" \
  && echo "export CNNEXP_TEST_SLURM=1"

#!/usr/bin/env bash
# A one-node SLURM on localhost, with accounting, for testing the sweep launchers for real (CI, or a laptop):
#
#   sudo scripts/slurm_cluster.sh start     # install if missing, configure, start the daemons, wait for an idle node
#   eval "$(scripts/slurm_cluster.sh env)"  # SLURM_CONF for sinfo/sbatch/squeue/sacct in this shell
#   scripts/slurm_cluster.sh status         # which daemons run, and sinfo
#   sudo scripts/slurm_cluster.sh stop      # cancel the jobs, stop the daemons, remove the state directory
#
# start/stop need root (or sudo): munged runs as the munge user, mariadbd as mysql, slurmd must switch to the
# submitting user. Jobs may be submitted by any user. Debian/Ubuntu only (apt-get); tested on Debian 12 with
# SLURM 22.05 in a container without systemd, hence daemons started by hand rather than as services (policy-rc.d
# blocks those there). Accounting (mariadbd + slurmdbd) is not optional: without it sacct knows nothing and
# submitit cannot tell that a SIGKILLed task failed, so it waits forever.
#
# Environment: QPEFT_SLURM_DIR (state, configs, logs; default /tmp/qpeft-slurm), QPEFT_SLURM_TIMEOUT (seconds to
# wait for the node; default 60). Uses the machine-wide munge socket and key (/run/munge, /etc/munge/munge.key)
# and SLURM's default ports 6817-6819, so it cannot run next to a real SLURM on the same machine. The partition
# is called `local`; the node offers every CPU and all memory but 1 GiB.
set -euo pipefail

STATE=${QPEFT_SLURM_DIR:-/tmp/qpeft-slurm}
TIMEOUT=${QPEFT_SLURM_TIMEOUT:-60}
CONF=$STATE/etc/slurm.conf
DB=$STATE/mysql                      # mariadbd dies silently unless its pid and log files are inside its datadir
DB_SOCK=$DB/mysqld.sock
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
DAEMONS=(slurmd slurmctld slurmdbd mariadbd munged)    # stop order; start order is the reverse
export SLURM_CONF=$CONF

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }
need_root() { [ "$(id -u)" -eq 0 ] || die "'$1' needs root: sudo $0 $1"; }
pidfile() {
    case $1 in
        munged) echo /run/munge/munged.pid ;;   # munged writes as the munge user: its own directories
        mariadbd) echo "$DB/mariadb.pid" ;;
        *) echo "$STATE/run/$1.pid" ;;
    esac
}
alive() { local f; f=$(pidfile "$1"); [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; }
logfile() {
    case $1 in
        munged) echo /var/log/munge/munged.log ;;
        mariadbd) echo "$DB/mariadb.err" ;;
        *) echo "$STATE/log/$1.log" ;;
    esac
}

log_tails() {
    local d
    for d in "${DAEMONS[@]}"; do
        echo "--- $d: $(alive "$d" && echo running || echo NOT running); last lines of $(logfile "$d"):" >&2
        tail -n 15 "$(logfile "$d")" 2>/dev/null >&2 || true
    done
}

# wait_for SECONDS WHAT COMMAND...: poll COMMAND until it succeeds; on timeout say what failed and show the logs.
wait_for() {
    local secs=$1 what=$2 t0=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        if [ $((SECONDS - t0)) -ge "$secs" ]; then
            log_tails
            die "timed out after ${secs}s waiting for $what (logs above; state in $STATE)"
        fi
        sleep 0.5
    done
}

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return
    command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get: install them by hand"
    echo "installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_configs() {
    local host cpu mem
    host=$(hostname -s)
    # The node's CPU layout exactly as slurmd sees it (a mismatch drains the node), memory 1 GiB under the total
    # so that the daemons and the test process keep some.
    cpu=$(slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ RealMemory=[0-9]*//')
    mem=$(($(slurmd -C | head -n 1 | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p') - 1024))
    mkdir -p "$STATE"/{etc,run,log,state,spool}
    chmod 755 "$STATE"
    cat >"$CONF" <<EOF
# written by scripts/slurm_cluster.sh; removed by its 'stop'
ClusterName=qpeft
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$(logfile slurmctld)
SlurmdLogFile=$(logfile slurmd)
# No cgroups in a container: track processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Finished jobs leave squeue quickly; sacct (slurmdbd) keeps them.
MinJobAge=30
KillWait=5
NodeName=$host NodeAddr=127.0.0.1 $cpu RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$STATE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$(pidfile slurmdbd)
LogFile=$(logfile slurmdbd)
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=qpeft
EOF
    chmod 600 "$STATE/etc/slurmdbd.conf"   # slurmdbd refuses a readable file: it holds the DB password
}

start_munged() {
    # One munged per machine (the socket path is fixed in every client): reuse a working one.
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 600 /etc/munge/munge.key
    su -s /bin/sh munge -c munged ||
        { log_tails; die "munged did not start"; }
    touch "$STATE/run/munged.ours"    # 'stop' kills only a munged that this script started
}

start_mariadbd() {
    if [ ! -d "$DB/mysql" ]; then
        mkdir -p "$DB"
        chown mysql:mysql "$DB"
        mariadb-install-db --no-defaults --user=mysql --datadir="$DB" --auth-root-authentication-method=socket \
            >"$STATE/log/mariadb-install.log" 2>&1 || { cat "$STATE/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
    fi
    # No TCP: only slurmdbd on this machine talks to it, through the socket.
    setsid mariadbd --no-defaults --user=mysql --datadir="$DB" --skip-networking --socket="$DB_SOCK" \
        --pid-file="$(pidfile mariadbd)" --log-error="$(logfile mariadbd)" </dev/null >/dev/null 2>&1 &
    wait_for 30 "mariadbd to accept connections" mariadb --no-defaults --socket="$DB_SOCK" -u root -e "select 1"
    mariadb --no-defaults --socket="$DB_SOCK" -u root -e "
        CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'qpeft';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

start() {
    need_root start
    install_packages
    [ -f "$CONF" ] || write_configs
    alive munged || start_munged
    alive mariadbd || start_mariadbd
    # slurmdbd reaches mariadbd through the socket named by MYSQL_UNIX_PORT (its config has no socket setting).
    alive slurmdbd || MYSQL_UNIX_PORT=$DB_SOCK slurmdbd
    wait_for 30 "slurmdbd to answer" sacctmgr -n list cluster
    # Register the cluster before slurmctld first connects, so that its jobs are accounted from the start.
    sacctmgr -n list cluster format=cluster | grep -qw qpeft || sacctmgr -i add cluster qpeft >/dev/null
    alive slurmctld || slurmctld
    alive slurmd || slurmd
    wait_for "$TIMEOUT" "the node to be idle in sinfo" node_idle
    echo "SLURM is up: $(sinfo -h -o '%P %D node %t %c CPUs %m MB'); now: eval \"\$($0 env)\"" >&2
}

node_idle() { sinfo -h -o %t | grep -qx idle; }

stop() {
    need_root stop
    local d f pid
    if alive slurmctld; then
        # Job steps outlive slurmd (slurmstepd is a process of its own): cancel the jobs while slurmctld can.
        # shellcheck disable=SC2046
        scancel --quiet $(squeue -h -o %A 2>/dev/null) 2>/dev/null || true
        for _ in $(seq 20); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
    fi
    for d in "${DAEMONS[@]}"; do
        [ "$d" = munged ] && [ ! -f "$STATE/run/munged.ours" ] && continue
        f=$(pidfile "$d")
        alive "$d" || continue
        pid=$(cat "$f")
        kill "$pid"
        for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    done
    rm -rf "$STATE"
}

status() {
    local d rc=0
    for d in "${DAEMONS[@]}"; do
        if alive "$d"; then echo "$d: running (pid $(cat "$(pidfile "$d")"))"; else echo "$d: not running"; rc=1; fi
    done
    [ -f "$CONF" ] && sinfo 2>&1 || true
    return $rc
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) die "usage: $0 start|stop|status|env   (state in \$QPEFT_SLURM_DIR, default /tmp/qpeft-slurm)" ;;
esac

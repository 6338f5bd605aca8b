#!/usr/bin/env bash
# Throwaway single-node Ceph cluster (1 mon, 1 OSD, 1 radosgw/beast) for S3 tests.
#
#   eval "$(tests/s3/start-ceph-rgw.sh /tmp/ceph-rgw)"     # prints `export S3_...` lines
#   (tests/conftest.py: the `rgw` fixture runs it on free ports for the S3 tests)
#   tests/s3/stop-ceph-rgw.sh /tmp/ceph-rgw [--purge]
#
# Everything (config, mon store, OSD data, logs, pid files) lives under DIR.
# No systemd, no cephx (auth none), no mgr, loopback only.
# Idempotent: if the cluster in DIR is already up and answering, it only reprints the
# exports; if it is half up or stale, the old daemons (PIDs recorded in DIR) are stopped
# and a fresh cluster is created.
# stdout: only `export` lines (safe for eval); progress goes to stderr.
#
# Environment knobs (defaults):
#   CEPH_OBJECTSTORE   bluestore | memstore (bluestore: sparse file-backed device, RSS
#                      bounded by osd_memory_target; memstore: all data in OSD RAM)
#   CEPH_OSD_SIZE_GB   20    size of the sparse bluestore block file / memstore cap
#   CEPH_OSD_MEMORY_MB 1024  osd_memory_target for bluestore (min 896)
#   CEPH_MON_PORT      13300 (msgr v2; v1 uses +1)
#   CEPH_OSD_PORT_MIN  16800 (OSD binds in [min, min+99])
#   CEPH_RGW_PORT      17480
#   S3_BUCKET          registry   (created; empty string = create none)
#   S3_ACCESS_KEY / S3_SECRET_KEY  generated if unset (kept in DIR/s3-credentials)
#   CEPH_INSTALL       1     apt-get install the ceph packages if missing
set -euo pipefail

DIR=${1:-${CEPH_RGW_DIR:-/tmp/ceph-rgw}}
OBJECTSTORE=${CEPH_OBJECTSTORE:-bluestore}
OSD_SIZE_GB=${CEPH_OSD_SIZE_GB:-20}
OSD_MEMORY_MB=${CEPH_OSD_MEMORY_MB:-1024}
MON_PORT=${CEPH_MON_PORT:-13300}
OSD_PORT_MIN=${CEPH_OSD_PORT_MIN:-16800}
RGW_PORT=${CEPH_RGW_PORT:-17480}
BUCKET=${S3_BUCKET-registry}
HOST=127.0.0.1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { printf '[start-ceph-rgw %5.1fs] %s\n' "$(( $(date +%s%N) / 1000000 - T0 ))e-3" "$*" >&2; }
T0=$(( $(date +%s%N) / 1000000 ))
die() { log "ERROR: $*"; for f in "$DIR"/log/*.log; do [ -f "$f" ] && { echo "--- tail $f" >&2; tail -n 15 "$f" >&2; }; done; exit 1; }

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
CONF=$DIR/ceph.conf
CEPH=(timeout 30 ceph -c "$CONF" --connect-timeout 20)

# ---------- packages ----------
need_pkgs=()
for b in ceph-mon:ceph-mon ceph-osd:ceph-osd radosgw:radosgw radosgw-admin:radosgw ceph:ceph-common monmaptool:ceph-common; do
  command -v "${b%%:*}" >/dev/null 2>&1 || need_pkgs+=("${b##*:}")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  [ "${CEPH_INSTALL:-1}" = 1 ] || die "missing binaries (packages: ${need_pkgs[*]}); set CEPH_INSTALL=1"
  log "installing ceph-mon ceph-osd radosgw ceph-common (apt, no recommends)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends ceph-mon ceph-osd radosgw ceph-common >&2 2>&1 || {
    apt-get update -q >&2 && apt-get install -y -q --no-install-recommends ceph-mon ceph-osd radosgw ceph-common >&2; }
fi
command -v curl >/dev/null || { apt-get install -y -q --no-install-recommends curl >&2; }

alive() {  # alive NAME -> pid of our daemon NAME if running (cmdline must reference our conf)
  local f=$DIR/run/$1.pid pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "$CONF" || return 1
  echo "$pid"
}

print_exports() {
  # shellcheck disable=SC1091
  . "$DIR/s3-credentials"
  cat <<EOF
export S3_ENDPOINT=http://$HOST:$RGW_PORT
export S3_REGION=us-east-1
export S3_ACCESS_KEY=$S3_ACCESS_KEY
export S3_SECRET_KEY=$S3_SECRET_KEY
export S3_BUCKET=$BUCKET
export AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY
export CEPH_RGW_DIR=$DIR
export CEPH_CONF=$CONF
export CEPH_MON_PID=$(alive mon)
export CEPH_OSD_PID=$(alive osd)
export CEPH_RGW_PID=$(alive rgw)
EOF
}

# ---------- already running? ----------
if [ -f "$DIR/s3-credentials" ] && [ -f "$DIR/ready" ] && alive mon >/dev/null && alive osd >/dev/null && alive rgw >/dev/null \
   && [ "$(curl -s -o /dev/null -m 5 -w '%{http_code}' "http://$HOST:$RGW_PORT/")" = 200 ]; then
  log "cluster in $DIR already up"
  print_exports
  exit 0
fi

# ---------- stale or partial: stop what we started before, then wipe ----------
if [ -n "$(ls -A "$DIR")" ]; then
  [ -f "$DIR/.ceph-rgw-scratch" ] || die "$DIR is not empty and was not made by this script; refusing to wipe it"
  log "stale cluster in $DIR: stopping its daemons and wiping it"
  "$HERE/stop-ceph-rgw.sh" "$DIR" --purge >&2 || true
  mkdir -p "$DIR"; touch "$DIR/.ceph-rgw-scratch"
fi
touch "$DIR/.ceph-rgw-scratch"
mkdir -p "$DIR"/{mon/a,osd/0,run,log,rgw,crash}

for p in "$MON_PORT" "$((MON_PORT + 1))" "$RGW_PORT"; do
  if (exec 3<>"/dev/tcp/$HOST/$p") 2>/dev/null; then die "port $p on $HOST already in use"; fi
done

FSID=$(cat /proc/sys/kernel/random/uuid)
OSD_UUID=$(cat /proc/sys/kernel/random/uuid)
if [ -n "${S3_ACCESS_KEY:-}" ] && [ -n "${S3_SECRET_KEY:-}" ]; then AK=$S3_ACCESS_KEY; SK=$S3_SECRET_KEY
else read -r AK SK < <(python3 -c 'import secrets as s, string as t; print("".join(s.choice(t.ascii_uppercase + t.digits) for _ in range(20)), "".join(s.choice(t.ascii_letters + t.digits) for _ in range(40)))'); fi
printf 'S3_ACCESS_KEY=%s\nS3_SECRET_KEY=%s\n' "$AK" "$SK" > "$DIR/s3-credentials"
chmod 600 "$DIR/s3-credentials"

MON_ADDR="[v2:$HOST:$MON_PORT,v1:$HOST:$((MON_PORT + 1))]"
if [ "$OBJECTSTORE" = memstore ]; then
  STORE_CONF="osd objectstore = memstore
memstore device bytes = $((OSD_SIZE_GB * 1024 * 1024 * 1024))"
else
  STORE_CONF="osd objectstore = bluestore
bluestore block create = true
bluestore block size = $((OSD_SIZE_GB * 1024 * 1024 * 1024))
bluestore fsck on mount = false
osd memory target = $((OSD_MEMORY_MB * 1024 * 1024))"
fi

cat > "$CONF" <<EOF
# generated by start-ceph-rgw.sh -- throwaway test cluster, do not use for real data
[global]
fsid = $FSID
mon host = $MON_ADDR
public addr = $HOST
ms bind ipv6 = false
ms bind port min = $OSD_PORT_MIN
ms bind port max = $((OSD_PORT_MIN + 99))
auth cluster required = none
auth service required = none
auth client required = none
auth supported = none
# radosgw defaults to ms_mon_client_mode=secure, which "auth none" cannot satisfy (-13 EACCES)
ms mon client mode = crc
ms client mode = crc
run dir = $DIR/run
admin socket = $DIR/run/\$name.asok
log file = $DIR/log/\$name.log
crash dir = $DIR/crash
keyring = /dev/null
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon max pg per osd = 1000
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 2
mon data avail crit = 1
osd crush chooseleaf type = 0
# commit monitor maps quickly (pool creation by radosgw waits on them)
paxos propose interval = 0.05
paxos min wait = 0.01

[mon]
mon data = $DIR/mon/\$id

[osd]
osd data = $DIR/osd/\$id
$STORE_CONF
osd op num shards = 2
osd op num threads per shard = 2

[client.rgw.a]
# tcp_nodelay: beast leaves Nagle's algorithm on, so a response with a body (a listing, a small
# GET) waited ~40 ms for the client's delayed ACK: 10 ms listings took 53 ms, 2 ms GETs 43 ms
rgw frontends = beast endpoint=$HOST:$RGW_PORT tcp_nodelay=1
rgw data = $DIR/rgw
rgw thread pool size = 64
rgw enable apis = s3, admin
# reclaim the space of deleted objects after 5 min instead of 2 h
rgw gc obj min wait = 300
rgw gc processor period = 300
EOF

start_daemon() {  # start_daemon NAME CMD... ; daemon in foreground mode, own session, logs in DIR/log
  local name=$1; shift
  setsid "$@" -f </dev/null >"$DIR/log/$name.out" 2>&1 &
  echo $! > "$DIR/run/$name.pid"
}

wait_for() {  # wait_for SECONDS DESC CMD...
  local limit=$1 desc=$2; shift 2
  local end=$(( $(date +%s) + limit ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || die "timed out after ${limit}s waiting for $desc"
    sleep 0.2
  done
}

# ---------- mon ----------
log "creating mon (fsid $FSID) in $DIR, objectstore=$OBJECTSTORE"
monmaptool --create --fsid "$FSID" --addv a "$MON_ADDR" "$DIR/monmap" >/dev/null
ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" >"$DIR/log/mon-mkfs.out" 2>&1 || die "ceph-mon --mkfs failed"
start_daemon mon ceph-mon -c "$CONF" -i a
wait_for 60 "mon quorum" "${CEPH[@]}" mon stat
log "mon up (pid $(alive mon))"

# ---------- osd ----------
OSD_ID=$("${CEPH[@]}" osd new "$OSD_UUID")
[ "$OSD_ID" = 0 ] || die "unexpected osd id $OSD_ID"
ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$OSD_UUID" >"$DIR/log/osd-mkfs.out" 2>&1 || die "ceph-osd --mkfs failed"
start_daemon osd ceph-osd -c "$CONF" -i 0
osd_up() { "${CEPH[@]}" osd dump 2>/dev/null | grep -q '^osd\.0 up'; }
wait_for 90 "osd.0 up" osd_up
log "osd.0 up (pid $(alive osd))"

# ---------- rgw ----------
# pre-create the pools radosgw would otherwise create lazily on first bucket/object
for pool in .rgw.root default.rgw.log default.rgw.control default.rgw.meta \
            default.rgw.buckets.index default.rgw.buckets.data default.rgw.buckets.non-ec; do
  "${CEPH[@]}" osd pool create "$pool" 8 8 replicated >/dev/null 2>&1 || die "pool create $pool failed"
  "${CEPH[@]}" osd pool application enable "$pool" rgw >/dev/null 2>&1 || true
done
log "pools created"
start_daemon rgw radosgw -c "$CONF" -n client.rgw.a
rgw_ok() { [ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' "http://$HOST:$RGW_PORT/")" = 200 ]; }
wait_for 120 "radosgw on $HOST:$RGW_PORT" rgw_ok
log "radosgw up on http://$HOST:$RGW_PORT (pid $(alive rgw))"

timeout 60 radosgw-admin -c "$CONF" user create --uid=s3test --display-name="s3 test user" \
  --access-key="$AK" --secret-key="$SK" >"$DIR/log/user-create.out" 2>&1 || die "radosgw-admin user create failed"

# ---------- bucket (SigV4 with the Python stdlib; no boto3 needed) ----------
if [ -n "$BUCKET" ]; then
  python3 - "$HOST:$RGW_PORT" "$AK" "$SK" "$BUCKET" <<'PY' || die "bucket create failed"
import datetime, hashlib, hmac, http.client, sys
hostport, ak, sk, bucket = sys.argv[1:]
now = datetime.datetime.now(datetime.timezone.utc)
amzdate, day, region = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d"), "us-east-1"
ph = hashlib.sha256(b"").hexdigest()
canon = f"PUT\n/{bucket}\n\nhost:{hostport}\nx-amz-content-sha256:{ph}\nx-amz-date:{amzdate}\n\nhost;x-amz-content-sha256;x-amz-date\n{ph}"
scope = f"{day}/{region}/s3/aws4_request"
sts = f"AWS4-HMAC-SHA256\n{amzdate}\n{scope}\n{hashlib.sha256(canon.encode()).hexdigest()}"
k = ("AWS4" + sk).encode()
for part in (day, region, "s3", "aws4_request"):
    k = hmac.new(k, part.encode(), hashlib.sha256).digest()
sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
auth = f"AWS4-HMAC-SHA256 Credential={ak}/{scope}, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={sig}"
c = http.client.HTTPConnection(hostport, timeout=60)
c.request("PUT", f"/{bucket}", headers={"Host": hostport, "x-amz-date": amzdate, "x-amz-content-sha256": ph, "Authorization": auth})
r = c.getresponse(); body = r.read()
if r.status not in (200, 409) or (r.status == 409 and b"BucketAlreadyOwnedByYou" not in body):
    sys.exit(f"PUT /{bucket}: {r.status} {body[:300]!r}")
PY
  log "bucket $BUCKET created"
fi

touch "$DIR/ready"
log "ready: mon=$(alive mon) osd=$(alive osd) rgw=$(alive rgw)"
print_exports

#!/bin/bash
# sluice's resident memory across many reloads, with no connections: N (default 300) times,
# the config file changes, sluice gets SIGHUP, and the script waits for
# sluice_reloads_total{result="ok"} to count it; RSS is printed every 50 reloads.
# Run from the checkout after `make build`; it uses loopback ports 19900-19903.
set -u
BIN=${BIN:-target/release/sluice}
N=${N:-300}
cat > ${TMPDIR:-/tmp}/sluice-reload-rss.conf <<C
admin 127.0.0.1:19901;
access_log off;
upstream u { server 127.0.0.1:19902; server 127.0.0.1:19903; health_check interval=1s; }
listen 127.0.0.1:19900 { proxy u; idle_timeout 600s; }
C
$BIN -c ${TMPDIR:-/tmp}/sluice-reload-rss.conf 2>/dev/null &
PID=$!
sleep 0.5
for i in $(seq 1 $N); do
  sed -i "s/idle_timeout [0-9]*s/idle_timeout $((600 + i % 2))s/" ${TMPDIR:-/tmp}/sluice-reload-rss.conf
  kill -HUP $PID
  for t in $(seq 1 100); do
    ok=$(curl -s http://127.0.0.1:19901/metrics | sed -n 's/^sluice_reloads_total{result="ok"} //p')
    [ "$ok" = "$i" ] && break
    sleep 0.01
  done
  if [ $((i % 50)) = 0 ]; then echo "reloads $i rss $(grep VmRSS /proc/$PID/status)"; fi
done
kill $PID

#!/bin/sh
# Installs the proxies `make bench-compare` measures sluice against: haproxy, nginx with its
# stream module, and socat, from Debian's packages. Only as root and only where apt-get exists;
# otherwise it says what is missing and exits 0, so the bench still runs with what there is.
#
# Debian starts a service when its package is installed (nginx would listen on port 80 on every
# address). A policy-rc.d that answers 101 ("action forbidden") stops that; it is put in place
# only if the system has none, and removed afterwards.

set -u

have() {
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]
}

missing=""
have haproxy || missing="$missing haproxy"
have nginx || missing="$missing nginx"
[ -f /usr/lib/nginx/modules/ngx_stream_module.so ] || missing="$missing libnginx-mod-stream"
have socat || missing="$missing socat"

if [ -z "$missing" ]; then
    echo "bench-compare: haproxy, nginx (stream) and socat are installed"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "bench-compare: not root, cannot install:$missing; running with what is installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "bench-compare: no apt-get, cannot install:$missing; running with what is installed"
    exit 0
fi

policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# Temporary, from sluice bench/install-compare.sh: start no service.\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    own_policy=1
    trap 'rm -f "$policy"' EXIT INT TERM
fi

echo "bench-compare: installing:$missing"
if ! { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y haproxy nginx libnginx-mod-stream socat; }; then
    echo "bench-compare: install failed; running with what is installed"
fi
[ "$own_policy" = 1 ] && rm -f "$policy"
exit 0

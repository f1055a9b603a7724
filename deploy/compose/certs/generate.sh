#!/usr/bin/env bash
# Credentials for a TLS + SuperNode-authentication deployment of flwr-guard.
#
#   deploy/compose/certs/generate.sh [OUT_DIR]     (default: deploy/compose/credentials)
#
# Writes, with openssl (TLS) and ssh-keygen (SuperNode keys, the format Flower reads):
#   ca.crt, ca.key             self-signed CA: ECDSA P-256, SHA-256, CA:TRUE pathlen:0
#   server.crt, server.key     the SuperLink's certificate, signed by the CA: serverAuth,
#                              SANs = superlink, localhost, 127.0.0.1, ::1 + $SUPERLINK_HOSTS
#   supernode-<i>, .pub        ECDSA P-384 OpenSSH key pair of SuperNode i (0..NODES-1)
#
# Environment:
#   SUPERLINK_HOSTS  extra names / IPs clients dial, space-separated, e.g.
#                    "fl.example.com 203.0.113.7" (every address SuperNodes and the flwr
#                    CLI use must be in the certificate, or they refuse it)
#   NODES            number of SuperNode key pairs (default 3)
#   DAYS             validity in days (default 365)
#   FORCE=1          overwrite existing credentials (default: refuse)
#
# The folder is private (0700). ca.key stays 0600: keep it offline once the server
# certificate is made. The files the containers mount (server.key, supernode-<i>) are
# 0644 so that the containers' non-root user (uid 10001) can read them through the
# bind mount; the 0700 folder keeps them private on the host.
# This mirrors flwr_guard.deployment.tls (same names and algorithms).
set -euo pipefail

OUT_DIR="${1:-$(cd "$(dirname "$0")/.." && pwd)/credentials}"
NODES="${NODES:-3}"
DAYS="${DAYS:-365}"
SUPERLINK_HOSTS="${SUPERLINK_HOSTS:-}"

command -v openssl >/dev/null || { echo "openssl is required" >&2; exit 1; }
command -v ssh-keygen >/dev/null || { echo "ssh-keygen (openssh-client) is required" >&2; exit 1; }
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || { echo "NODES must be a positive integer, got '$NODES'" >&2; exit 2; }
[[ "$DAYS" =~ ^[1-9][0-9]*$ ]] || { echo "DAYS must be a positive integer, got '$DAYS'" >&2; exit 2; }
if [[ -e "$OUT_DIR/ca.crt" && "${FORCE:-0}" != "1" ]]; then
  echo "$OUT_DIR already holds credentials; set FORCE=1 to replace them" >&2
  exit 1
fi

umask 077
mkdir -p "$OUT_DIR"
chmod 700 "$OUT_DIR"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# subjectAltName: IP literals as IP:, names as DNS:, without duplicates.
# (bash 3.2 compatible: no associative arrays, no word splitting with globbing)
read -r -a extra_hosts <<< "$SUPERLINK_HOSTS"
sans=""
for host in superlink localhost 127.0.0.1 ::1 ${extra_hosts[@]+"${extra_hosts[@]}"}; do
  if [[ "$host" =~ ^[0-9.]+$ || "$host" == *:* ]]; then
    entry="IP:$host"
  else
    entry="DNS:$host"
  fi
  case ",$sans," in *",$entry,"*) continue ;; esac
  sans+="${sans:+,}$entry"
done

openssl ecparam -name prime256v1 -genkey -noout -out "$OUT_DIR/ca.key"
openssl req -x509 -new -sha256 -days "$DAYS" -key "$OUT_DIR/ca.key" \
  -subj "/CN=flwr-guard deployment CA" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -addext "subjectKeyIdentifier=hash" \
  -out "$OUT_DIR/ca.crt"

openssl ecparam -name prime256v1 -genkey -noout -out "$WORK/server.key"
openssl req -new -sha256 -key "$WORK/server.key" -subj "/CN=superlink" -out "$WORK/server.csr"
cat > "$WORK/server.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$sans
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EOF
openssl x509 -req -sha256 -days "$DAYS" -in "$WORK/server.csr" \
  -CA "$OUT_DIR/ca.crt" -CAkey "$OUT_DIR/ca.key" -set_serial "0x$(openssl rand -hex 16)" \
  -extfile "$WORK/server.ext" -out "$OUT_DIR/server.crt" 2>/dev/null
# PKCS#8, like flwr_guard.deployment.tls.
openssl pkcs8 -topk8 -nocrypt -in "$WORK/server.key" -out "$OUT_DIR/server.key"
openssl verify -CAfile "$OUT_DIR/ca.crt" "$OUT_DIR/server.crt" >/dev/null

for ((i = 0; i < NODES; i++)); do
  rm -f "$OUT_DIR/supernode-$i" "$OUT_DIR/supernode-$i.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode-$i" -f "$OUT_DIR/supernode-$i"
  chmod 644 "$OUT_DIR/supernode-$i"
done
chmod 644 "$OUT_DIR/ca.crt" "$OUT_DIR/server.crt" "$OUT_DIR/server.key" "$OUT_DIR"/supernode-*.pub
chmod 600 "$OUT_DIR/ca.key"

echo "credentials in $OUT_DIR"
echo "SuperLink certificate SANs: $sans"

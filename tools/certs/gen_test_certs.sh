#!/usr/bin/env bash
# Throwaway PKI for tests and local experiments (never for production; never
# commit its output): gen_test_certs.sh OUTDIR writes, all PEM,
#   ca.pem ca.key                 a CA (the "cluster CA", also used for the public API)
#   node.pem node.key             signed by ca: serverAuth+clientAuth, SANs
#                                 DNS:localhost, DNS:kl-worker, IP:127.0.0.1 (every process)
#   client.pem client.key         signed by ca: clientAuth only (a public client)
#   other-ca.pem                  an unrelated CA
#   other.pem other.key           signed by other-ca, same SANs as node (an impostor)
# EC P-256 keys, valid 2 days. Needs openssl (tools/install_deps.sh).
set -euo pipefail
out=${1:?usage: gen_test_certs.sh OUTDIR}
mkdir -p "$out"
cd "$out"
umask 077
ossl() { openssl "$@" 2>/dev/null; }

ca() {  # name subject
  ossl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=$2" -keyout "$1.key" -out "$1.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
}
leaf() {  # name ca subject extendedKeyUsage
  cat >"$1.ext" <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=$4
subjectAltName=DNS:localhost,DNS:kl-worker,IP:127.0.0.1
EXT
  ossl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$3" \
    -keyout "$1.key" -out "$1.csr"
  ossl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial -days 2 \
    -extfile "$1.ext" -out "$1.pem"
  rm -f "$1.csr" "$1.ext"
}

ca ca "kl test CA"
leaf node ca "kl-node" "serverAuth,clientAuth"
leaf client ca "kl-client" "clientAuth"
ca other-ca "unrelated CA"
leaf other other-ca "kl-impostor" "serverAuth,clientAuth"
rm -f ./*.srl other-ca.key
chmod 644 ./*.pem

#!/usr/bin/env bash
# Generates a throwaway test CA and a server certificate for localhost and
# 127.0.0.1, for the TLS conformance run and the browser test.
#
# Usage: scripts/test-cert.sh DIR
# Writes DIR/ca.pem (trust this), DIR/server.pem and DIR/server.key (give
# these to the server), and DIR/spki.txt (base64 SHA-256 of the server's
# public key, for Chromium's --ignore-certificate-errors-spki-list).
set -euo pipefail
dir="${1:?usage: scripts/test-cert.sh DIR}"
mkdir -p "$dir"
cd "$dir"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout ca.key -out ca.pem -days 2 -subj "/CN=durable-streams test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
cat > server.ext <<'EXT'
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1
EXT
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
  -out server.pem -days 2 -extfile server.ext 2>/dev/null
openssl x509 -in server.pem -pubkey -noout | openssl pkey -pubin -outform der \
  | openssl dgst -sha256 -binary | base64 > spki.txt
rm -f server.csr server.ext ca.srl

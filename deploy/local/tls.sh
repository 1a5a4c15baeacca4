#!/usr/bin/env bash
# Generates, once, the local stack's TLS material under $AUDIT_STATE_DIR/tls with openssl: a private
# CA, a server certificate for localhost/127.0.0.1 (Kafka's TLS listeners and ClickHouse's HTTPS
# port), a client certificate (mutual TLS), and a second CA that trusts nothing here (for the tests
# of a wrong CA). Local development and tests only. Safe to run any number of times.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

command -v openssl >/dev/null || die "openssl is needed to generate the local certificates"
mkdir -p "$TLS_DIR"
cd "$TLS_DIR"

# ca NAME: a self-signed CA, NAME.key + NAME.crt.
ca() {
  [[ -f "$1.crt" ]] && return 0
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.crt" -days 3650 \
    -subj "/CN=audit-logs local $1" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}

# leaf NAME CN USAGE [SAN]: a key (PKCS#8, unencrypted) and a certificate signed by the CA.
leaf() {
  local name="$1" cn="$2" usage="$3" san="${4:-}"
  [[ -f "$name.crt" ]] && return 0
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$name.key" 2>/dev/null
  openssl req -new -key "$name.key" -subj "/CN=$cn" -out "$name.csr" 2>/dev/null
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$usage"
    [[ -n "$san" ]] && echo "subjectAltName=$san"
  } > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}

ca ca
ca other-ca
leaf server localhost serverAuth "DNS:localhost,IP:127.0.0.1"
leaf client audit-client clientAuth
# Kafka reads a PEM key store: the private key, then the certificate.
cat server.key server.crt > server-keystore.pem
chmod 600 ./*.key server-keystore.pem

#!/usr/bin/env bash
# Installs what the build and the local stack need and is missing: the C build tools and OpenSSL
# headers librdkafka is built with (cmake, pkg-config, libssl-dev), kcat, openssl and stunnel from
# Debian's packages, the ClickHouse engine from PyPI (chdb-core, pinned), the Apache Kafka jars from
# Maven Central. Safe to run any number of times.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

apt_install() {
  local missing=()
  # The build: librdkafka (cmake) with TLS against the system's OpenSSL, libcurl built in.
  command -v cmake >/dev/null || missing+=(cmake)
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  command -v cc >/dev/null || missing+=(gcc)
  command -v c++ >/dev/null || missing+=(g++)
  [[ -f /usr/include/openssl/ssl.h ]] || missing+=(libssl-dev)
  # The local stack's certificates (deploy/local/tls.sh).
  command -v openssl >/dev/null || missing+=(openssl)
  # HTTPS in front of the ClickHouse engine (clickhouse.sh).
  command -v stunnel4 >/dev/null || missing+=(stunnel4)
  command -v kcat >/dev/null || missing+=(kcat)
  # The API fuzzer and the deploy checks install their PyPI tools into virtual environments.
  python3 -c "import ensurepip" 2>/dev/null || missing+=(python3-venv)
  (( ${#missing[@]} == 0 )) && return 0
  log "installing ${missing[*]} with apt-get"
  local sudo=""
  [[ "$(id -u)" == 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

kafka_jars() {
  if [[ -f "$KAFKA_LIB/kafka_2.13-$AUDIT_KAFKA_VERSION.jar" ]]; then
    return 0
  fi
  command -v java >/dev/null || die "java (17+) is needed to run Kafka"
  command -v mvn >/dev/null || die "mvn is needed to fetch the Kafka jars"
  log "fetching Apache Kafka $AUDIT_KAFKA_VERSION jars from Maven Central"
  rm -rf "$KAFKA_LIB.tmp"
  mkdir -p "$KAFKA_LIB.tmp"
  if ! mvn -B -Dstyle.color=never -f "$LOCAL_DIR/kafka-pom.xml" -Dkafka.version="$AUDIT_KAFKA_VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIB.tmp" \
    >"$AUDIT_STATE_DIR/mvn.log" 2>&1; then
    tail -n 30 "$AUDIT_STATE_DIR/mvn.log" >&2
    die "mvn could not fetch the Kafka jars (full log: $AUDIT_STATE_DIR/mvn.log)"
  fi
  rm -rf "$KAFKA_LIB"
  mv "$KAFKA_LIB.tmp" "$KAFKA_LIB"
}

# The ClickHouse engine: the pinned chdb-core wheel (ClickHouse 26.9 as a library) in a venv.
clickhouse_engine() {
  if "$AUDIT_CHDB_VENV/bin/python" -c "import chdb" 2>/dev/null; then
    return 0
  fi
  log "installing the ClickHouse engine (PyPI chdb-core==$AUDIT_CHDB_VERSION, about 180 MB) into $AUDIT_CHDB_VENV"
  rm -rf "$AUDIT_CHDB_VENV"
  python3 -m venv "$AUDIT_CHDB_VENV"
  "$AUDIT_CHDB_VENV/bin/pip" install -q --disable-pip-version-check "chdb-core==$AUDIT_CHDB_VERSION" \
    || die "pip could not install chdb-core==$AUDIT_CHDB_VERSION"
}

# An implementation of Standard Webhooks independent of ours, for the stream tests.
webhook_verifier() {
  if "$AUDIT_VERIFY_VENV/bin/python" -c "import standardwebhooks" 2>/dev/null; then
    return 0
  fi
  log "installing standardwebhooks==$AUDIT_STANDARDWEBHOOKS_VERSION (PyPI) into $AUDIT_VERIFY_VENV"
  rm -rf "$AUDIT_VERIFY_VENV"
  python3 -m venv "$AUDIT_VERIFY_VENV"
  "$AUDIT_VERIFY_VENV/bin/pip" install -q --disable-pip-version-check \
    "standardwebhooks==$AUDIT_STANDARDWEBHOOKS_VERSION" \
    || die "pip could not install standardwebhooks==$AUDIT_STANDARDWEBHOOKS_VERSION"
}

mkdir -p "$AUDIT_STATE_DIR"
apt_install
clickhouse_engine
kafka_jars
webhook_verifier

"""Checks of deploy/ that need no cluster and no Docker engine (run by check-deploy.sh):

- Dockerfile: the targets, binaries, ports, users and listen addresses agree with the workspace
  and the chart (the images are not built here: no Docker engine on the CI machine);
- Compose file: same ports and settings as `make run`, every build target exists, loopback only;
- Grafana dashboard and Prometheus rules: structure, and every metric they use is exported by a
  running audit-ingest or audit-api (started here against the local stack);
- the rendered ServiceMonitors (a CRD kubernetes-validate cannot check);
- topic names: the chart, the Compose file and the local scripts use those of
  `shared/event/src/topics.rs`.
"""
import argparse
import base64
import http.server
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
import uuid

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy/helm/audit-logs"
failures = []


def check(ok, message):
    if not ok:
        failures.append(message)


def binaries():
    names = set()
    for manifest in ["services/ingest/Cargo.toml", "services/api/Cargo.toml"]:
        data = tomllib.loads((ROOT / manifest).read_text())
        names.update(b["name"] for b in data.get("bin", []))
        bin_dir = (ROOT / manifest).parent / "src/bin"
        if bin_dir.exists():
            names.update(p.stem for p in bin_dir.glob("*.rs"))
            names.update(p.parent.name for p in bin_dir.glob("*/main.rs"))
    return names


def check_dockerfile(values):
    text = (ROOT / "deploy/docker/Dockerfile").read_text()
    stages = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            current = m.group(2) or m.group(1)
            stages[current] = {"base": m.group(1), "lines": []}
        elif current and line.strip() and not line.lstrip().startswith("#"):
            stages[current]["lines"].append(line.strip())
    known = binaries()
    built = re.findall(r"--bin\s+(\S+)", text)
    check(set(built) <= known, f"Dockerfile builds unknown binaries {set(built) - known}")
    run_as = values["podSecurityContext"]["runAsUser"]
    for target, port, prefix, command in [("ingest", values["ingest"]["httpPort"], "AUDIT_INGEST", "run"),
                                          ("api", values["api"]["httpPort"], "AUDIT_API", "serve")]:
        stage = stages.get(target)
        check(stage is not None, f"Dockerfile has no target {target}")
        if not stage:
            continue
        body = "\n".join(stage["lines"])
        check("distroless" in stage["base"] and "nonroot" in stage["base"], f"{target}: runtime base must be distroless nonroot")
        copied = re.findall(r"COPY --from=build \S+/target/release/(\S+) /usr/local/bin/(\S+)", body)
        check(copied, f"{target}: copies no binary")
        for source, dest in copied:
            check(source == dest and source in known and source in built, f"{target}: copies {source}, which is not built")
        check(f"USER {run_as}:{run_as}" in body, f"{target}: USER must be {run_as}:{run_as} (the chart's runAsUser)")
        check(f"EXPOSE {port}" in body, f"{target}: EXPOSE {port} (the chart's httpPort)")
        check(f"{prefix}__HTTP_LISTEN=0.0.0.0:{port}" in body, f"{target}: must listen on 0.0.0.0:{port} in a container")
        entry = re.search(r'ENTRYPOINT \["/usr/local/bin/([^"]+)"\]', body)
        check(entry and entry.group(1) == f"audit-{target}", f"{target}: ENTRYPOINT must be its binary")
        check(f'CMD ["{command}"]' in body, f'{target}: CMD ["{command}"]')
    build = stages.get("build", {"base": ""})["base"]
    version = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.split()[1]
    toolchain = ".".join(version.split(".")[:2])
    check(build == f"rust:{toolchain}-bookworm", f"build stage {build} differs from the CI toolchain rust:{toolchain}")
    ignore = (ROOT / "deploy/docker/Dockerfile.dockerignore").read_text().split()
    check("target" in ignore and ".state" in ignore, "Dockerfile.dockerignore must leave out target and .state")
    check_linked_libraries(built)


# Shared libraries the distroless cc-debian12 runtime image provides (glibc, libgcc, libstdc++,
# OpenSSL 3). A binary that needs any other fails to start in the image.
DISTROLESS_CC_LIBRARIES = {
    "libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1", "ld-linux-x86-64.so.2",
    "libgcc_s.so.1", "libstdc++.so.6", "libssl.so.3", "libcrypto.so.3",
}


def check_linked_libraries(built):
    """The images cannot be built here (no Docker engine); what can be checked is that each binary
    the images copy needs no shared library the runtime base lacks (readelf on the build that
    `make test` made: same features and link line as the release build)."""
    found = 0
    for name in sorted(set(built)):
        for profile in ("debug", "release"):
            binary = ROOT / "target" / profile / name
            if binary.exists():
                break
        else:
            continue
        found += 1
        out = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True, check=True).stdout
        needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out))
        extra = needed - DISTROLESS_CC_LIBRARIES
        check(not extra, f"{name} needs shared libraries the distroless image lacks: {sorted(extra)}")
    check(found >= 2, "no built audit-ingest / audit-api binary to check the linked libraries of (build first)")


def check_compose():
    compose = yaml.safe_load((ROOT / "deploy/compose/docker-compose.yml").read_text())
    services = compose["services"]
    docker_targets = re.findall(r"AS (\w+)", (ROOT / "deploy/docker/Dockerfile").read_text())
    run_sh = (ROOT / "deploy/local/run.sh").read_text()
    common = (ROOT / "deploy/local/common.sh").read_text()
    expected = {  # host port -> service, as in `make run`
        18123: "clickhouse", 19092: "kafka", 18081: "ingest", 18080: "api",
    }
    published = {}
    for name, service in services.items():
        for port in service.get("ports", []):
            check(port.startswith("127.0.0.1:"), f"compose {name}: {port} must bind 127.0.0.1")
            published[int(port.split(":")[1])] = name
        if "build" in service:
            check(service["build"]["target"] in docker_targets, f"compose {name}: unknown build target")
    for port, name in expected.items():
        check(published.get(port) == name, f"compose: port {port} must be {name}'s (as in make run)")
    check("18123" in common and "19092" in common, "make run ports moved: update the compose file")
    topics = re.findall(r"(identity\.\w+\.v1|audit\.\w+\.v1):(\d+)", json.dumps(services["kafka-topics"]))
    # What `make up` creates: AUDIT_TOPICS as common.sh computes it.
    created = subprocess.run(["bash", "-c", 'source deploy/local/common.sh; echo "$AUDIT_TOPICS"'],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
    local_topics = re.findall(r"(identity\.\w+\.v1|audit\.\w+\.v1):(\d+)", created)
    check(local_topics and set(topics) == set(local_topics),
          f"compose topics {topics} differ from make up's {local_topics}")
    demo = " ".join(services["demo-producer"]["command"])
    for flag in ["--count 400", "--spread-days 7", "--orgs org_demo,org_acme", "--seed 7"]:
        check(flag in demo and flag in run_sh.replace("\\\n", " ").replace("  ", " "), f"demo producer: {flag} differs from make run")
    # run.sh consumes the identity topics and the read events (see check_topics).
    check("AUDIT_INGEST__KAFKA__TOPICS=\"${AUDIT_IDENTITY_TOPICS// /,},$AUDIT_READS_TOPIC\"" in run_sh,
          "make run's ingest topics are no longer the identity topics and the read events: update the checks")


METRIC = re.compile(r"\baudit_(?:ingest|api|stream)_[a-z_]+")


def used_metrics():
    dashboard = json.loads((ROOT / "deploy/grafana/audit-logs.json").read_text())
    check(dashboard.get("uid") and dashboard.get("title"), "dashboard needs uid and title")
    exprs = []
    ids = set()
    for panel in dashboard["panels"]:
        check(panel["id"] not in ids, f"dashboard: duplicate panel id {panel['id']}")
        ids.add(panel["id"])
        check(panel.get("targets"), f"dashboard panel {panel.get('title')} has no query")
        for target in panel.get("targets", []):
            exprs.append(("dashboard: " + panel["title"], target["expr"]))
    rules = yaml.safe_load((ROOT / "deploy/prometheus/audit-logs-rules.yaml").read_text())
    alerts = set()
    for group in rules["groups"]:
        check(group.get("name") and group.get("rules"), "rule group needs a name and rules")
        for rule in group["rules"]:
            check(rule.get("alert") and rule.get("expr"), f"rule {rule} needs alert and expr")
            check(rule["alert"] not in alerts, f"duplicate alert {rule['alert']}")
            alerts.add(rule["alert"])
            check(rule.get("labels", {}).get("severity") in {"warning", "critical"}, f"{rule['alert']}: severity")
            check(rule.get("annotations", {}).get("summary"), f"{rule['alert']}: summary")
            check(re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), f"{rule['alert']}: for")
            exprs.append(("rule: " + rule["alert"], rule["expr"]))
    for where, expr in exprs:
        check(expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), f"{where}: unbalanced {expr}")
    for needed in ["consumer_lag", "dead_lettered", "newest_occurred_at", "last_progress_timestamp", "requests_total",
                   "audit_stream_state", "audit_stream_lag_seconds"]:
        check(any(needed in e for _, e in exprs if _.startswith("rule")), f"no alert on {needed}")
    names = {}
    for where, expr in exprs:
        for name in METRIC.findall(expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            names.setdefault(base, where)
    return names


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.2)
    return False


class Accepting(http.server.BaseHTTPRequestHandler):
    """A webhook receiver that takes everything (the check's stream delivers to it)."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def exported_metrics():
    """Runs both services against the local stack, sends them traffic, reads /metrics."""
    brokers = os.environ.get("AUDIT_TEST_KAFKA_BROKERS", "127.0.0.1:19092")
    clickhouse = os.environ.get("AUDIT_TEST_CLICKHOUSE_URL", "http://127.0.0.1:18123")
    suffix = uuid.uuid4().hex[:10]
    database = f"audit_deploy_check_{suffix}"
    topics = [f"test.deploy.{t}.{suffix}" for t in ("users", "teams", "auth", "dlq", "reads", "stored")]
    kafka_lib = f"{os.environ.get('AUDIT_STATE_DIR', ROOT / '.state')}/kafka-4.1.1/lib/*"
    for topic in topics:
        subprocess.run(["java", "-cp", kafka_lib, "org.apache.kafka.tools.TopicCommand", "--bootstrap-server", brokers,
                        "--create", "--topic", topic, "--partitions", "1", "--replication-factor", "1"],
                       check=True, capture_output=True)
    ingest_port, api_port, streams_port = free_port(), free_port(), free_port()
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Accepting)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    env = dict(os.environ)
    env.update({
        "AUDIT_INGEST__KAFKA__BROKERS": brokers, "AUDIT_INGEST__KAFKA__TOPICS": ",".join(topics[:3] + topics[4:5]),
        "AUDIT_INGEST__STORED_EVENTS__TOPIC": topics[5], "AUDIT_API__STREAMS__TOPIC": topics[5],
        "AUDIT_API__STREAMS__SECRET_KEY": base64.b64encode(os.urandom(32)).decode(),
        "AUDIT_API__STREAMS__ALLOW_HTTP": "true", "AUDIT_API__STREAMS__ALLOW_PRIVATE_DESTINATIONS": "true",
        "AUDIT_API__STREAMS__GROUP_ID": f"deploy-check-streams-{suffix}",
        "AUDIT_INGEST__KAFKA__GROUP_ID": f"deploy-check-{suffix}", "AUDIT_INGEST__DEAD_LETTER__TOPIC": topics[3],
        "AUDIT_INGEST__CLICKHOUSE__URL": clickhouse, "AUDIT_INGEST__CLICKHOUSE__DATABASE": database,
        "AUDIT_INGEST__HTTP_LISTEN": f"127.0.0.1:{ingest_port}", "AUDIT_INGEST__TELEMETRY__LOG_FILTER": "warn",
        "AUDIT_API__CLICKHOUSE__URL": clickhouse, "AUDIT_API__CLICKHOUSE__DATABASE": database,
        "AUDIT_API__HTTP_LISTEN": f"127.0.0.1:{api_port}", "AUDIT_API__READ_EVENTS__BROKERS": brokers,
        "AUDIT_API__READ_EVENTS__TOPIC": topics[4], "AUDIT_API__TELEMETRY__LOG_FILTER": "warn",
    })
    target = ROOT / "target/debug"
    processes = [subprocess.Popen([target / "audit-ingest", "run"], env=env, stdout=subprocess.DEVNULL)]
    try:
        check(wait_http(f"http://127.0.0.1:{ingest_port}/readyz"), "audit-ingest did not become ready")
        processes.append(subprocess.Popen([target / "audit-api", "serve"], env=env, stdout=subprocess.DEVNULL))
        check(wait_http(f"http://127.0.0.1:{api_port}/readyz"), "audit-api did not become ready")
        subprocess.run([target / "audit-api", "streams", "create", "--org", "org_check", "--json", json.dumps(
            {"name": "check", "destination": {"type": "webhook", "url": f"http://127.0.0.1:{receiver.server_port}/"}})],
            env=env, check=True, capture_output=True)
        processes.append(subprocess.Popen([target / "audit-api", "streams", "run"],
                                          env=dict(env, AUDIT_API__HTTP_LISTEN=f"127.0.0.1:{streams_port}"),
                                          stdout=subprocess.DEVNULL))
        check(wait_http(f"http://127.0.0.1:{streams_port}/readyz"), "the stream worker did not become ready")
        subprocess.run([target / "audit-loadgen", "--brokers", brokers, "--count", "50", "--users-topic", topics[0],
                        "--teams-topic", topics[1], "--auth-topic", topics[2], "--orgs", "org_check"],
                       check=True, capture_output=True)
        subprocess.run(["kcat", "-P", "-b", brokers, "-t", topics[0]], input=b"not json\n", check=True)
        key = subprocess.run([target / "audit-api", "keys", "create", "--org", "org_check", "--role", "admin", "--quiet"],
                             env=env, check=True, capture_output=True, text=True).stdout.strip()
        time.sleep(3)  # key refresh, flushes
        for path in ["/api/v1/organization/audit-logs?limit=5", "/api/v1/organization/audit-logs?format=csv",
                     "/api/v1/organization/audit-logs/export?format=ndjson"]:
            request = urllib.request.Request(f"http://127.0.0.1:{api_port}{path}", headers={"X-API-Key": key})
            with urllib.request.urlopen(request, timeout=10) as r:
                r.read()
        time.sleep(2)  # read events published, ingest lag and offsets reported, streams delivered
        exported = set()
        for port in (ingest_port, api_port, streams_port):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                for line in r.read().decode().splitlines():
                    m = re.match(r"# TYPE (\S+) ", line)
                    if m:
                        exported.add(m.group(1))
        return exported
    finally:
        for p in processes:
            p.send_signal(signal.SIGTERM)
        for p in processes:
            p.wait(timeout=30)
        receiver.shutdown()
        urllib.request.urlopen(urllib.request.Request(clickhouse, data=f"DROP DATABASE IF EXISTS {database}".encode()))
        for topic in topics:
            subprocess.run(["java", "-cp", kafka_lib, "org.apache.kafka.tools.TopicCommand", "--bootstrap-server", brokers,
                            "--delete", "--topic", topic], capture_output=True)


def check_service_monitors(rendered):
    found = 0
    for path in pathlib.Path(rendered, "all-features").rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "ServiceMonitor":
                found += 1
                spec = doc["spec"]
                check(spec["selector"]["matchLabels"].get("app.kubernetes.io/component") in {"api", "ingest", "streams"}, "ServiceMonitor selector")
                check(spec["endpoints"][0]["port"] == "http" and spec["endpoints"][0]["path"] == "/metrics", "ServiceMonitor endpoint")
    check(found == 3, f"expected 3 ServiceMonitors with every feature on, found {found}")


def check_topics(values):
    text = (ROOT / "shared/event/src/topics.rs").read_text()
    named = dict(re.findall(r'pub const (\w+): &str = "([^"]+)";', text))
    identity = [named[n] for n in re.search(r"IDENTITY: \[&str; 3\] = \[([^\]]+)\]", text).group(1).replace(" ", "").split(",")]
    check(values["ingest"]["topics"] == identity, f"chart ingest.topics {values['ingest']['topics']} != {identity}")
    check(values["ingest"]["deadLetterTopic"] == named["DEAD_LETTERS"], "chart ingest.deadLetterTopic differs from topics::DEAD_LETTERS")
    check(values["api"]["readEvents"]["topic"] == named["READS"], "chart api.readEvents.topic differs from topics::READS")
    check(values["streams"]["topic"] == named["STORED"], "chart streams.topic differs from topics::STORED")
    shell = subprocess.run(
        ["bash", "-c", 'source deploy/local/common.sh; echo "$AUDIT_IDENTITY_TOPICS|$AUDIT_DEAD_LETTER_TOPIC|$AUDIT_READS_TOPIC|$AUDIT_STORED_TOPIC"'],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip().split("|")
    check(shell == [" ".join(identity), named["DEAD_LETTERS"], named["READS"], named["STORED"]], f"deploy/local/common.sh topics {shell} differ from topics.rs")
    compose = (ROOT / "deploy/compose/docker-compose.yml").read_text()
    consumed = ",".join(identity + [named["READS"]])
    check(f"AUDIT_INGEST__KAFKA__TOPICS: {consumed}" in compose, f"Compose file's ingest does not consume {consumed}")
    for name in identity + [named["DEAD_LETTERS"], named["READS"], named["STORED"]]:
        check(f"{name}:" in compose, f"Compose file does not create topic {name}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rendered", required=True)
    parser.add_argument("--no-services", action="store_true", help="skip the running-services metric check")
    args = parser.parse_args()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    check_dockerfile(values)
    check_compose()
    check_service_monitors(args.rendered)
    check_topics(values)
    used = used_metrics()
    if not args.no_services:
        exported = exported_metrics()
        for name, where in sorted(used.items()):
            check(name in exported, f"{where} uses {name}, which neither service exports")
        print(f"deploy check: {len(used)} metric names used by the dashboard and rules, all exported "
              f"({len(exported)} exported)" if not failures else "deploy check: metric names compared")
    if failures:
        print("deploy check FAILED:", *failures, sep="\n  - ", file=sys.stderr)
        sys.exit(1)
    print("deploy check: Dockerfile, Compose file, dashboard, alert rules, ServiceMonitors and topic names passed")


if __name__ == "__main__":
    main()

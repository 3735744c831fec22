"""Validates docker-compose.yml without a Docker engine: variables interpolated as Compose
does (`${VAR}`, `${VAR:-default}`, `${VAR:?message}`, `$$`), then the result checked against
the Compose Specification's JSON schema (vendored: deploy/compose/compose-spec.json, from
github.com/compose-spec/compose-spec, schema/compose-spec.json, Apache-2.0), then what this
project promises of it: authentication on, named volumes, healthchecks, two Kafka listeners.

    python deploy/compose/check.py [docker-compose.yml]
"""

import json
import pathlib
import re
import sys

import jsonschema
import yaml

HERE = pathlib.Path(__file__).resolve().parent
VAR = re.compile(r"\$(\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value, env, missing):
    if isinstance(value, str):
        def sub(m):
            if m.group(1) == "$":
                return "$"
            name = m.group(2) or m.group(5)
            op, arg = m.group(3), m.group(4)
            if name in env:
                return env[name]
            if op and op.endswith("?"):
                missing.append(f"{name}: {arg}")
                return "x" * 32
            return arg if op and op.endswith("-") else ""
        return VAR.sub(sub, value)
    if isinstance(value, list):
        return [interpolate(v, env, missing) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env, missing) for k, v in value.items()}
    return value


def main(path):
    doc = yaml.safe_load(pathlib.Path(path).read_text())
    # Every required variable must say what to set (their messages are collected, and
    # stand in for values here).
    required = []
    doc = interpolate(doc, {}, required)
    schema = json.loads((HERE / "compose-spec.json").read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    problems = [f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors]

    services = doc.get("services", {})
    declared = set((doc.get("volumes") or {}).keys())
    for name, svc in services.items():
        for v in svc.get("volumes", []):
            source = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
            if source and not source.startswith((".", "/")) and source not in declared:
                problems.append(f"services/{name}: volume '{source}' is not declared under volumes")
        if svc.get("restart") != "no" and name != "loadgen" and "healthcheck" not in svc:
            problems.append(f"services/{name}: a long-running service needs a healthcheck")
        for port in svc.get("ports", []):
            if name != "gateway" and not str(port).startswith("127.0.0.1:"):
                problems.append(f"services/{name}: port {port} must be published on 127.0.0.1 only")
    rp = services.get("redpanda", {})
    image = rp.get("image", "")
    m = re.search(r":v(\d+)\.", image)
    if not m or int(m.group(1)) < 25:
        problems.append(f"services/redpanda: {image} is not a supported Redpanda (25.x or newer)")
    script = "\n".join(rp.get("command", []))
    for needle in ("name: internal", "name: external", "authentication_method: sasl", "authentication_method: http_basic"):
        if needle not in script:
            problems.append(f"services/redpanda: the listener configuration lacks '{needle}'")
    bootstrap = (doc.get("configs", {}).get("redpanda-bootstrap", {}) or {}).get("content", "")
    if "enable_sasl: true" not in bootstrap:
        problems.append("configs/redpanda-bootstrap: SASL must be on")
    for name in ("processor", "notifier", "sink", "gateway", "topics", "loadgen"):
        env = services.get(name, {}).get("environment", {})
        if env.get("KAFKA_PROPERTY_SECURITY_PROTOCOL") != "SASL_PLAINTEXT":
            problems.append(f"services/{name}: must authenticate to Kafka (KAFKA_PROPERTY_SECURITY_PROTOCOL)")
    if services.get("gateway", {}).get("environment", {}).get("PRESENCE_GATEWAY__AUTH") != "jwt":
        problems.append("services/gateway: published beyond loopback, it must require tokens")
    if not required:
        problems.append("no secret is required from the environment: passwords would be inlined")

    if problems:
        print(f"{path}: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"{path}: valid against the Compose Specification; {len(services)} services, secrets from "
          f"{len(set(r.split(':')[0] for r in required))} environment variables")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "docker-compose.yml"))

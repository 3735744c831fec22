#!/usr/bin/env bash
# The packaging checks `make test` runs, offline once the tools are cached:
#   1. the Helm chart rendered with `helm template` for every value set in
#      deploy/helm/presence/ci/, linted (`helm lint --strict`) and validated strictly against
#      the Kubernetes schemas (`kubernetes-validate --strict`, schemas bundled); the
#      ServiceMonitor, a CRD those schemas do not have, is checked for its required fields;
#   2. docker-compose.yml against the Compose Specification (deploy/compose/check.py), and
#      a broken variant of it must be refused (the check can fail).
# Tools: deploy/stack.sh helm (go install, cached) and the venv's Python packages.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
HELM="$(bash deploy/stack.sh helm)"
PY="$(bash deploy/stack.sh venv-python)"
"$PY" -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null || bash deploy/stack.sh deps >/dev/null
VALIDATE="$(dirname "$PY")/kubernetes-validate"
CHART=deploy/helm/presence
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

for values in "$CHART"/ci/*-values.yaml; do
  name="$(basename "$values" -values.yaml)"
  "$HELM" lint --strict "$CHART" -f "$values" >"$out/lint-$name.log" 2>&1 \
    || { cat "$out/lint-$name.log" >&2; echo "helm lint failed for $values" >&2; exit 1; }
  "$HELM" template presence "$CHART" -f "$values" --namespace presence >"$out/$name.yaml"
  # kubernetes-validate knows the built-in kinds; the operator's ServiceMonitor is checked
  # by check_crds below.
  "$PY" - "$out/$name.yaml" "$out/$name" <<'PY'
import sys, yaml, pathlib
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
base = pathlib.Path(sys.argv[2]); base.mkdir()
crds = []
for i, d in enumerate(docs):
    if d.get("apiVersion", "").startswith("monitoring.coreos.com/"):
        crds.append(d)
        continue
    (base / f"{i:02d}-{d['kind']}.yaml").write_text(yaml.safe_dump(d))
for d in crds:
    spec = d.get("spec", {})
    assert d["kind"] == "ServiceMonitor", d["kind"]
    assert spec.get("selector", {}).get("matchLabels"), "ServiceMonitor without a selector"
    for e in spec.get("endpoints", []):
        assert e.get("port") == "ops" and e.get("path") == "/metrics", e
    assert spec.get("endpoints"), "ServiceMonitor without endpoints"
# Nothing inlines a secret: every credential comes from a secretKeyRef.
SECRET_WORDS = ("PASSWORD", "JWT_SECRET", "TICKET_SECRET", "REDIS_URL", "DATABASE_URL")
def envs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "env" and isinstance(v, list):
                yield from v
            else:
                yield from envs(v)
    elif isinstance(node, list):
        for v in node:
            yield from envs(v)
for d in docs:
    if d["kind"] == "Secret":
        sys.exit(f"the chart must reference Secrets, not create them: {d['metadata']['name']}")
    for e in envs(d):
        if any(w in e["name"] for w in SECRET_WORDS) and "secretKeyRef" not in e.get("valueFrom", {}):
            sys.exit(f"{d['kind']} {d['metadata']['name']}: {e['name']} must come from a Secret")
print(f"{len(docs)} objects, {len(crds)} custom")
PY
  "$VALIDATE" --strict --quiet "$out/$name"/*.yaml \
    || { echo "kubernetes-validate --strict refused the chart rendered with $values" >&2; exit 1; }
  echo "chart ok with $(basename "$values")"
done

"$PY" deploy/compose/check.py docker-compose.yml
# The check must be able to fail: a misspelt service key is not Compose.
sed 's/^    image: redis:7.4$/    imagee: redis:7.4/' docker-compose.yml >"$out/broken-compose.yml"
if "$PY" deploy/compose/check.py "$out/broken-compose.yml" 2>/dev/null; then
  echo "deploy/compose/check.py accepted a compose file with an unknown service key" >&2; exit 1
fi
echo "compose ok"

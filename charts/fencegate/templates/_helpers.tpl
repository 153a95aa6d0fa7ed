{{/* Chart name, truncated to the 63 characters Kubernetes names allow. */}}
{{- define "fencegate.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped base name. */}}
{{- define "fencegate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fencegate.injector" -}}{{ include "fencegate.fullname" . | trunc 54 | trimSuffix "-" }}-injector{{- end -}}
{{- define "fencegate.filter" -}}{{ include "fencegate.fullname" . | trunc 56 | trimSuffix "-" }}-filter{{- end -}}
{{- define "fencegate.tlsSecret" -}}{{ .Values.tls.existingSecret | default (printf "%s-tls" (include "fencegate.injector" .)) }}{{- end -}}

{{/* Cluster-scoped objects carry the namespace in their name: two releases
     of the same name in two namespaces must not overwrite each other's. */}}
{{- define "fencegate.webhookName" -}}{{ printf "%s-%s" (include "fencegate.injector" .) .Release.Namespace | trunc 253 | trimSuffix "-" }}{{- end -}}

{{/* The container securityContext the `restricted` Pod Security level asks
     for; 65532 is the distroless nonroot user the Dockerfile runs as. */}}
{{- define "fencegate.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "fencegate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "fencegate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "fencegate.selector" -}}
app.kubernetes.io/name: {{ include "fencegate.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "fencegate.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The webhook's namespaceSelector. Helm merges a user's map into the
     default one, so custom matchExpressions would be ANDed with the default
     label; given matchExpressions replace it instead (add the label as an
     expression, or set matchLabels explicitly to keep it). */}}
{{- define "fencegate.namespaceSelector" -}}
{{- $sel := .Values.webhook.namespaceSelector | default dict -}}
{{- if $sel.matchExpressions -}}
{{- $out := dict "matchExpressions" $sel.matchExpressions -}}
{{- $labels := $sel.matchLabels | default dict -}}
{{- if ne (toJson $labels) (toJson (dict "fencegate.io/injection" "enabled")) -}}
{{- $_ := set $out "matchLabels" $labels -}}
{{- end -}}
{{- toYaml (omit $out (ternary "matchLabels" "" (empty $labels))) -}}
{{- else -}}
{{- toYaml $sel -}}
{{- end -}}
{{- end -}}

{{/* The filter's etcd endpoints when it uses etcd (filter.verify); empty otherwise. */}}
{{- define "fencegate.filterEtcd" -}}
{{- if .Values.filter.verify -}}{{ .Values.filter.etcdEndpoints | default .Values.sidecar.etcdEndpoints }}{{- end -}}
{{- end -}}

{{/* "true" when the filter's replicas share their marks through etcd; empty otherwise. */}}
{{- define "fencegate.filterShared" -}}
{{- if and (include "fencegate.filterEtcd" .) .Values.filter.sharedMarks -}}true{{- end -}}
{{- end -}}

{{/* filter.replicas, or its default: 3 with shared marks, 1 without. */}}
{{- define "fencegate.filterReplicas" -}}
{{- if kindIs "invalid" .Values.filter.replicas -}}{{ ternary 3 1 (eq (include "fencegate.filterShared" .) "true") }}{{- else -}}{{ .Values.filter.replicas }}{{- end -}}
{{- end -}}

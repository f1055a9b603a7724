{{/* Names and labels. Resources are named after the release: <release>-superlink, ... */}}
{{- define "flwr-guard.name" -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "flwr-guard.superlinkHost" -}}
{{- include "flwr-guard.name" . }}-superlink
{{- end -}}

{{- define "flwr-guard.labels" -}}
app.kubernetes.io/name: flwr-guard
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "flwr-guard.selector" -}}
app.kubernetes.io/name: flwr-guard
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "flwr-guard.tlsSecret" -}}
{{- .Values.tls.existingSecret | default (printf "%s-tls" (include "flwr-guard.name" .)) -}}
{{- end -}}

{{- define "flwr-guard.keysSecret" -}}
{{- .Values.supernodeAuth.existingSecret | default (printf "%s-supernode-keys" (include "flwr-guard.name" .)) -}}
{{- end -}}

{{- define "flwr-guard.secaggSecret" -}}
{{- .Values.secagg.existingSecret | default (printf "%s-secagg" (include "flwr-guard.name" .)) -}}
{{- end -}}

{{- define "flwr-guard.auth" -}}
{{- if and .Values.supernodeAuth.enabled (not .Values.tls.enabled) -}}
{{- fail "supernodeAuth.enabled needs tls.enabled: Flower refuses SuperNode authentication without TLS" -}}
{{- end -}}
{{- if .Values.supernodeAuth.enabled }}true{{ end -}}
{{- end -}}

{{/* Pod and container security settings shared by every Flower pod. */}}
{{- define "flwr-guard.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "flwr-guard.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* Flower's environment: no update check, no run-time dependency installation. */}}
{{- define "flwr-guard.flowerEnv" -}}
- name: FLWR_DISABLE_UPDATE_CHECK
  value: "1"
- name: FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION
  value: "1"
{{- if .Values.metrics.pushgatewayUrl }}
- name: FLWR_GUARD_PUSHGATEWAY_URL
  value: {{ .Values.metrics.pushgatewayUrl | quote }}
{{- end }}
{{- end -}}

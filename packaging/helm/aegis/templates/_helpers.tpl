{{/* Names and labels shared by every object of the chart. */}}
{{- define "aegis.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "aegis.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "aegis.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "aegis.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "aegis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "aegis.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "aegis.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "aegis.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: agent
{{- end -}}

{{- define "aegis.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "aegis.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "aegis.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The policy's source object: "secret", "configmap" or "" (no policy). */}}
{{- define "aegis.policySource" -}}
{{- $p := .Values.policy -}}
{{- $n := 0 -}}
{{- if $p.existingSecret }}{{ $n = add1 $n }}{{ end -}}
{{- if $p.existingConfigMap }}{{ $n = add1 $n }}{{ end -}}
{{- if $p.signed }}{{ $n = add1 $n }}{{ end -}}
{{- if gt $n 1 -}}
{{- fail "policy: set only one of existingSecret, existingConfigMap and signed" -}}
{{- end -}}
{{- if or $p.existingSecret $p.signed -}}secret{{- else if $p.existingConfigMap -}}configmap{{- end -}}
{{- end -}}

{{- define "aegis.trustConfigMap" -}}
{{- if .Values.trust.existingConfigMap -}}
{{- .Values.trust.existingConfigMap -}}
{{- else if .Values.trust.publicKeys -}}
{{- printf "%s-trust" (include "aegis.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/*
The probe command: `aegis status` whose exit codes are 0 enforcing/auditing, 1 degraded,
2 blind, 3 unknown (docs/DEGRADED_MODE.md).  "ready" needs 0; "alive" fails only on 2.
*/}}
{{- define "aegis.probe.alive" -}}
exec:
  command:
    - /bin/sh
    - -c
    - 'aegis status >/dev/null 2>&1; rc=$?; [ "$rc" -ne 2 ]'
{{- end -}}

{{/*
A container's securityContext: root (the trust store and the pins are root's), no
privilege escalation, read-only root filesystem, every capability dropped and only the
given list added (the init container adds none).  Never privileged.
Call: include "aegis.containerSecurityContext" (list $ CAPS)
*/}}
{{- define "aegis.containerSecurityContext" -}}
{{- $caps := index . 1 -}}
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsUser: 0
runAsGroup: 0
capabilities:
  drop: ["ALL"]
  {{- if $caps }}
  add:
    {{- toYaml $caps | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* /etc/aegis/aegis.toml inside the pod (aegis_stream.agent.config.AgentFile). */}}
{{- define "aegis.configToml" -}}
# rendered by the aegis Helm chart; keys: packaging/aegis.toml
state_dir = "/var/lib/aegis"
pin_root = "/sys/fs/bpf/aegis"
status_file = "/var/lib/aegis/status.json"
# the pod's own network namespace: reachable through the Service only
metrics_addr = "0.0.0.0:{{ int .Values.agent.metricsPort }}"
log_format = {{ .Values.agent.logFormat | quote }}
{{- if include "aegis.policySource" . }}
policy = "/etc/aegis/policy/{{ .Values.policy.key }}"
{{- end }}
{{- with .Values.agent.mode }}
mode = {{ . | quote }}
{{- end }}

[events]
path = "/var/log/aegis/{{ .Values.events.file }}"
max_bytes = {{ int64 .Values.events.maxBytes }}
backups = {{ int .Values.events.backups }}
compress = {{ .Values.events.compress }}
file_mode = {{ .Values.events.fileMode }}
{{- if .Values.agent.kafkaBootstrap }}

[fleet]
kafka = {{ .Values.agent.kafkaBootstrap | quote }}
{{- end }}
{{- end -}}

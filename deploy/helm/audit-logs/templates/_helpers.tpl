{{/* Names and labels shared by every template. */}}
{{- define "audit-logs.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "audit-logs.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "audit-logs.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "audit-logs.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: call with (dict "root" $ "component" "api"). */}}
{{- define "audit-logs.selectorLabels" -}}
app.kubernetes.io/name: {{ include "audit-logs.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "audit-logs.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "audit-logs.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Image of one component: call with (dict "root" $ "component" "api"). */}}
{{- define "audit-logs.image" -}}
{{- printf "%s-%s:%s" .root.Values.image.repository .component (default .root.Chart.AppVersion .root.Values.image.tag) -}}
{{- end -}}

{{- define "audit-logs.clickhouseSecretName" -}}
{{- if .Values.clickhouse.passwordSecret.create -}}
{{- printf "%s-clickhouse" (include "audit-logs.fullname" .) -}}
{{- else -}}
{{- .Values.clickhouse.passwordSecret.name -}}
{{- end -}}
{{- end -}}

{{- define "audit-logs.kafkaSecretName" -}}
{{- if .Values.kafka.saslPasswordSecret.create -}}
{{- printf "%s-kafka" (include "audit-logs.fullname" .) -}}
{{- else -}}
{{- .Values.kafka.saslPasswordSecret.name -}}
{{- end -}}
{{- end -}}

{{/* Secret-backed environment of a service: call with (dict "root" $ "prefix" "AUDIT_API" "kafkaKey" "READ_EVENTS"). */}}
{{- define "audit-logs.secretEnv" -}}
{{- $ch := include "audit-logs.clickhouseSecretName" .root -}}
{{- if $ch }}
- name: {{ .prefix }}__CLICKHOUSE__PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $ch }}
      key: {{ .root.Values.clickhouse.passwordSecret.key }}
{{- end }}
{{- $kafka := include "audit-logs.kafkaSecretName" .root -}}
{{- if and $kafka .kafkaKey }}
- name: {{ .prefix }}__{{ .kafkaKey }}__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $kafka }}
      key: {{ .root.Values.kafka.saslPasswordSecret.key }}
{{- end }}
{{- end -}}

{{/* The [clickhouse] and [telemetry] tables of a service's TOML configuration. */}}
{{- define "audit-logs.commonToml" -}}
[clickhouse]
url = {{ .Values.clickhouse.url | quote }}
database = {{ .Values.clickhouse.database | quote }}
user = {{ .Values.clickhouse.user | quote }}
compression = {{ .Values.clickhouse.compression | quote }}

[telemetry]
log_filter = {{ .Values.telemetry.logFilter | quote }}
log_format = {{ .Values.telemetry.logFormat | quote }}
{{- if .Values.telemetry.otlpEndpoint }}
otlp_endpoint = {{ .Values.telemetry.otlpEndpoint | quote }}
{{- end }}
{{- end -}}

{{- define "audit-logs.kafkaPropertiesToml" -}}
{{- range $key, $value := . }}
{{ $key | quote }} = {{ $value | toString | quote }}
{{- end }}
{{- end -}}

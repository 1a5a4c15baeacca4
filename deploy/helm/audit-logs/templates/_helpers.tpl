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
{{- $oauth := .root.Values.kafka.security.oauthbearer }}
{{- if and .kafkaKey $oauth.tokenEndpoint $oauth.clientSecretSecret.name }}
- name: {{ .prefix }}__{{ .kafkaKey }}__SECURITY__OAUTHBEARER__CLIENT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ $oauth.clientSecretSecret.name }}
      key: {{ $oauth.clientSecretSecret.key }}
{{- end }}
{{- end -}}

{{/* TLS material from Secrets, mounted under /etc/audit-logs/tls/<name>: CA certificates as
ca.crt, client certificates as tls.crt and tls.key. */}}
{{- define "audit-logs.tlsSecrets" -}}
{{- $v := .Values -}}
{{- $cas := dict "clickhouse-ca" $v.clickhouse.tls.caSecret "kafka-ca" $v.kafka.security.caSecret "otlp-ca" $v.telemetry.otlpTls.caSecret -}}
{{- $clients := dict "clickhouse-client" $v.clickhouse.tls.clientCertSecret "kafka-client" $v.kafka.security.clientCertSecret "otlp-client" $v.telemetry.otlpTls.clientCertSecret -}}
{{- range $name, $ca := $cas }}
{{- if $ca.name }}
{{ $name }}: {secretName: {{ $ca.name | quote }}, items: [{key: {{ $ca.key | quote }}, path: ca.crt}]}
{{- end }}
{{- end }}
{{- range $name, $secret := $clients }}
{{- if $secret }}
{{ $name }}: {secretName: {{ $secret | quote }}, items: [{key: tls.crt, path: tls.crt}, {key: tls.key, path: tls.key}]}
{{- end }}
{{- end }}
{{- end -}}

{{- define "audit-logs.tlsVolumes" -}}
{{- range $name, $secret := (include "audit-logs.tlsSecrets" . | fromYaml) }}
- name: {{ $name }}
  secret: {{ toJson $secret }}
{{- end }}
{{- end -}}

{{- define "audit-logs.tlsMounts" -}}
{{- range $name, $secret := (include "audit-logs.tlsSecrets" . | fromYaml) }}
- {name: {{ $name }}, mountPath: /etc/audit-logs/tls/{{ $name }}, readOnly: true}
{{- end }}
{{- end -}}

{{/* A [<table>] of TLS files: call with (dict "table" "clickhouse.tls" "dir" "clickhouse" "ca" <caSecret> "client" <clientCertSecret>). */}}
{{- define "audit-logs.tlsToml" -}}
{{- if or .ca.name .client }}

[{{ .table }}]
{{- if .ca.name }}
ca_file = "/etc/audit-logs/tls/{{ .dir }}-ca/ca.crt"
{{- end }}
{{- if .client }}
cert_file = "/etc/audit-logs/tls/{{ .dir }}-client/tls.crt"
key_file = "/etc/audit-logs/tls/{{ .dir }}-client/tls.key"
{{- end }}
{{- end }}
{{- end -}}

{{/* The Kafka security table of a service: call with (dict "root" $ "table" "kafka.security"). */}}
{{- define "audit-logs.kafkaSecurityToml" -}}
{{- $s := .root.Values.kafka.security }}
[{{ .table }}]
protocol = {{ $s.protocol | quote }}
endpoint_identification = {{ $s.endpointIdentification | quote }}
{{- with $s.saslMechanism }}
sasl_mechanism = {{ . | quote }}
{{- end }}
{{- with $s.saslUsername }}
sasl_username = {{ . | quote }}
{{- end }}
{{- if $s.caSecret.name }}
ca_file = "/etc/audit-logs/tls/kafka-ca/ca.crt"
{{- end }}
{{- if $s.clientCertSecret }}
cert_file = "/etc/audit-logs/tls/kafka-client/tls.crt"
key_file = "/etc/audit-logs/tls/kafka-client/tls.key"
{{- end }}
{{- with $s.oauthbearer }}
{{- if .tokenEndpoint }}

[{{ $.table }}.oauthbearer]
token_endpoint = {{ .tokenEndpoint | quote }}
client_id = {{ .clientId | quote }}
{{- with .scope }}
scope = {{ . | quote }}
{{- end }}

[{{ $.table }}.oauthbearer.extensions]
{{- range $key, $value := .extensions }}
{{ $key | quote }} = {{ $value | toString | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The [clickhouse] and [telemetry] tables of a service's TOML configuration. */}}
{{- define "audit-logs.commonToml" -}}
[clickhouse]
url = {{ .Values.clickhouse.url | quote }}
database = {{ .Values.clickhouse.database | quote }}
user = {{ .Values.clickhouse.user | quote }}
compression = {{ .Values.clickhouse.compression | quote }}
{{- with .Values.clickhouse.cluster }}
cluster = {{ . | quote }}
cluster_replicated = {{ $.Values.clickhouse.clusterReplicated }}
cluster_nodes = [{{ range $i, $node := $.Values.clickhouse.clusterNodes }}{{ if $i }}, {{ end }}{{ $node | quote }}{{ end }}]
{{- end }}
{{- include "audit-logs.tlsToml" (dict "table" "clickhouse.tls" "dir" "clickhouse" "ca" .Values.clickhouse.tls.caSecret "client" .Values.clickhouse.tls.clientCertSecret) }}

[telemetry]
log_filter = {{ .Values.telemetry.logFilter | quote }}
log_format = {{ .Values.telemetry.logFormat | quote }}
{{- if .Values.telemetry.otlpEndpoint }}
otlp_endpoint = {{ .Values.telemetry.otlpEndpoint | quote }}
{{- end }}
{{- include "audit-logs.tlsToml" (dict "table" "telemetry.otlp_tls" "dir" "otlp" "ca" .Values.telemetry.otlpTls.caSecret "client" .Values.telemetry.otlpTls.clientCertSecret) }}
{{- end -}}

{{- define "audit-logs.kafkaPropertiesToml" -}}
{{- range $key, $value := . }}
{{ $key | quote }} = {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{/* The stream key's environment variable, for the API and the stream worker. */}}
{{- define "audit-logs.streamsKeyEnv" -}}
{{- $key := .Values.streams.secretKey -}}
{{- if and .Values.streams.enabled (or $key.create $key.existingSecret) }}
- name: AUDIT_API__STREAMS__SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $key.existingSecret | default (printf "%s-streams" (include "audit-logs.fullname" .)) }}
      key: {{ $key.key }}
{{- end }}
{{- end -}}

{{/* The pseudonym key's environment variable (prefix AUDIT_API or AUDIT_INGEST). */}}
{{- define "audit-logs.pseudonymKeyEnv" -}}
{{- $key := .root.Values.retention.pseudonymKey -}}
{{- if or $key.create $key.existingSecret }}
- name: {{ .prefix }}__RETENTION__PSEUDONYM_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $key.existingSecret | default (printf "%s-pseudonyms" (include "audit-logs.fullname" .root)) }}
      key: {{ $key.key }}
{{- end }}
{{- end -}}

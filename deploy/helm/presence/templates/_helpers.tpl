{{/* The processes the chart runs: name, ops port, the config section of its ops_listen. */}}
{{- define "presence.processes" -}}
processor: 9101
notifier: 9102
sink: 9103
gateway: 9104
{{- end -}}

{{- define "presence.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 53 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 53 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "presence.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one process: (dict "root" $ "process" "gateway") */}}
{{- define "presence.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .process }}
{{- end -}}

{{- define "presence.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Environment every process shares: Kafka (SASL/TLS), Redis, PostgreSQL, registry. */}}
{{- define "presence.env" -}}
- name: KAFKA_BROKERS
  value: {{ .Values.kafka.brokers | quote }}
{{- $k := .Values.kafka }}
{{- if and $k.sasl.enabled $k.tls.enabled }}
- name: KAFKA_PROPERTY_SECURITY_PROTOCOL
  value: SASL_SSL
{{- else if $k.sasl.enabled }}
- name: KAFKA_PROPERTY_SECURITY_PROTOCOL
  value: SASL_PLAINTEXT
{{- else if $k.tls.enabled }}
- name: KAFKA_PROPERTY_SECURITY_PROTOCOL
  value: SSL
{{- end }}
{{- if $k.sasl.enabled }}
{{- if not $k.sasl.existingSecret }}{{ fail "kafka.sasl.existingSecret: name the Secret with the SASL username and password" }}{{ end }}
- name: KAFKA_PROPERTY_SASL_MECHANISM
  value: {{ $k.sasl.mechanism | quote }}
- name: KAFKA_PROPERTY_SASL_USERNAME
  valueFrom:
    secretKeyRef: {name: {{ $k.sasl.existingSecret }}, key: {{ $k.sasl.usernameKey }}}
- name: KAFKA_PROPERTY_SASL_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ $k.sasl.existingSecret }}, key: {{ $k.sasl.passwordKey }}}
{{- end }}
{{- if and $k.tls.enabled $k.tls.caSecret }}
- name: KAFKA_PROPERTY_SSL_CA_LOCATION
  value: /etc/presence/kafka-ca/{{ $k.tls.caKey }}
{{- end }}
{{- range $key, $value := $k.properties }}
- name: {{ printf "KAFKA_PROPERTY_%s" ($key | upper | replace "." "_") }}
  value: {{ $value | quote }}
{{- end }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef: {name: {{ .Values.redis.existingSecret }}, key: {{ .Values.redis.urlKey }}}
{{- if .Values.redis.tls.caSecret }}
- name: PRESENCE_REDIS__CA_FILE
  value: /etc/presence/redis-ca/{{ .Values.redis.tls.caKey }}
{{- end }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef: {name: {{ .Values.postgres.existingSecret }}, key: {{ .Values.postgres.urlKey }}}
{{- if .Values.postgres.tls.caSecret }}
- name: PRESENCE_DATABASE__CA_FILE
  value: /etc/presence/postgres-ca/{{ .Values.postgres.tls.caKey }}
{{- end }}
{{- if .Values.registry.enabled }}
{{- range $name, $value := .Values.registry.env }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- range $name, $key := .Values.registry.secretEnv }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef: {name: {{ required "registry.existingSecret: name the Secret that registry.secretEnv reads" $.Values.registry.existingSecret }}, key: {{ $key }}}
{{- end }}
{{- end }}
{{- range $name, $value := .Values.env }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{/* CA volumes (Secrets), mounted read-only where the env above points. */}}
{{- define "presence.volumes" -}}
- name: tmp
  emptyDir: {}
{{- if and .Values.kafka.tls.enabled .Values.kafka.tls.caSecret }}
- name: kafka-ca
  secret: {secretName: {{ .Values.kafka.tls.caSecret }}}
{{- end }}
{{- if .Values.redis.tls.caSecret }}
- name: redis-ca
  secret: {secretName: {{ .Values.redis.tls.caSecret }}}
{{- end }}
{{- if .Values.postgres.tls.caSecret }}
- name: postgres-ca
  secret: {secretName: {{ .Values.postgres.tls.caSecret }}}
{{- end }}
{{- end -}}

{{- define "presence.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if and .Values.kafka.tls.enabled .Values.kafka.tls.caSecret }}
- name: kafka-ca
  mountPath: /etc/presence/kafka-ca
  readOnly: true
{{- end }}
{{- if .Values.redis.tls.caSecret }}
- name: redis-ca
  mountPath: /etc/presence/redis-ca
  readOnly: true
{{- end }}
{{- if .Values.postgres.tls.caSecret }}
- name: postgres-ca
  mountPath: /etc/presence/postgres-ca
  readOnly: true
{{- end }}
{{- end -}}

{{/* Pod spec fields every pod shares. */}}
{{- define "presence.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
automountServiceAccountToken: false
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- /* volumes stays the last key: the processor's Deployment appends its state volume. */}}
volumes:
  {{- include "presence.volumes" . | nindent 2 }}
{{- end -}}

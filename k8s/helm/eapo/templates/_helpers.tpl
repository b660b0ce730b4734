{{- define "eapo.fullname" -}}
{{- printf "%s-eapo" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: stable across upgrades. Call with (dict "root" $ "component" "gateway"). */}}
{{- define "eapo.selector" -}}
app.kubernetes.io/name: eapo
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "eapo.labels" -}}
{{ include "eapo.selector" . }}
app.kubernetes.io/part-of: eapo
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "eapo.image" -}}
{{ printf "%s:%s" .repository .tag | quote }}
{{- end -}}

{{- define "eapo.redisUrlEnv" -}}
- name: REDIS_URL
{{- if .Values.redis.enabled }}
  value: {{ printf "redis://%s-redis:6379/0" (include "eapo.fullname" .) | quote }}
{{- else }}
  valueFrom:
    secretKeyRef:
      name: {{ required "redis.externalUrlSecret.name is required when redis.enabled=false" .Values.redis.externalUrlSecret.name }}
      key: {{ .Values.redis.externalUrlSecret.key }}
{{- end }}
{{- end -}}

{{/* Environment every EAPO role shares: the values' env map. */}}
{{- define "eapo.env" -}}
{{- range $k, $v := .Values.env }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- end -}}

{{- define "eapo.configVolume" -}}
- name: config
  configMap:
    name: {{ include "eapo.fullname" . }}-config
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "eapo.configMount" -}}
- name: config
  mountPath: /etc/eapo
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end -}}

{{- define "eapo.sharedVolume" -}}
- name: shared
  persistentVolumeClaim:
    claimName: {{ include "eapo.fullname" . }}-shared
{{- end -}}

{{- define "eapo.podSecurity" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Egress to Redis: the release's Redis pod, or (external Redis) any address on the Redis port. */}}
{{- define "eapo.redisEgress" -}}
- to:
{{- if .Values.redis.enabled }}
    - podSelector:
        matchLabels:
          {{- include "eapo.selector" (dict "root" . "component" "redis") | nindent 10 }}
{{- else }}
    - ipBlock: {cidr: 0.0.0.0/0}
{{- end }}
  ports: [{port: 6379, protocol: TCP}]
{{- end -}}

{{- define "eapo.peer" -}}
- podSelector:
    matchLabels:
      {{- include "eapo.selector" . | nindent 6 }}
{{- end -}}

{{/*
Labels on every object.
*/}}
{{- define "rlhf-jobs-rbac.labels" -}}
app.kubernetes.io/name: rlhf-jobs-rbac
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rlhf-jobs
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Names and labels shared by every template. */}}

{{- define "plansmith.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name: "<release>-plansmith", or just the release name when it already says plansmith. */}}
{{- define "plansmith.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "plansmith.selectorLabels" -}}
app.kubernetes.io/name: {{ include "plansmith.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "plansmith.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "plansmith.selectorLabels" . }}
app.kubernetes.io/part-of: plansmith
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "plansmith.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "plansmith.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* True (non-empty) when more than one operator replica runs and kopf peering is on. */}}
{{- define "plansmith.peering" -}}
{{- if gt (int .Values.replicaCount) 1 -}}true{{- end -}}
{{- end -}}

{{/* Namespaces that get a Role to read storage Secrets (the operator reads them in the InferenceModel's
     namespace): the operator's own (storage.secretName), every watched namespace and rbac.secretNamespaces,
     deduplicated; none when rbac.clusterWideSecrets already grants Secrets everywhere. */}}
{{- define "plansmith.roleNamespaces" -}}
{{- if .Values.rbac.clusterWideSecrets -}}
{{- list | toJson -}}
{{- else -}}
{{- concat (list .Release.Namespace) .Values.watchNamespaces .Values.rbac.secretNamespaces | uniq | toJson -}}
{{- end -}}
{{- end -}}

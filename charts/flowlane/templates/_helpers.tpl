{{/*
Names, labels and the wiring between the operator and the optional MinIO / MLflow, in one place
so that every template agrees on them.
*/}}

{{- define "flowlane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "flowlane.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* A component's object name: "<fullname>-<component>", kept within 63 characters. */}}
{{- define "flowlane.componentName" -}}
{{- printf "%s-%s" (include "flowlane.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "flowlane.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "flowlane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: flowlane
{{- end }}

{{/* Selector labels of one component (operator, minio, mlflow). Call with (dict "root" $ "component" "x"). */}}
{{- define "flowlane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flowlane.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "flowlane.componentLabels" -}}
{{ include "flowlane.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "flowlane.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "flowlane.componentName" (dict "root" . "component" "operator")) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name: set it to an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* "repository@digest" when a digest is set, else "repository:tag" (tag defaults to appVersion). */}}
{{- define "flowlane.image" -}}
{{- $image := .image }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default .root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/* The pod and container hardening every workload of this chart shares. */}}
{{- define "flowlane.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "flowlane.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* MinIO: Service name, endpoint and the Secret with its credentials (keys accessKey, secretKey). */}}
{{- define "flowlane.minio.name" -}}
{{- include "flowlane.componentName" (dict "root" . "component" "minio") }}
{{- end }}

{{- define "flowlane.minio.endpoint" -}}
{{- printf "http://%s.%s.svc:9000" (include "flowlane.minio.name" .) .Release.Namespace }}
{{- end }}

{{- define "flowlane.minio.secretName" -}}
{{- default (include "flowlane.minio.name" .) .Values.minio.auth.existingSecret }}
{{- end }}

{{- define "flowlane.mlflow.name" -}}
{{- include "flowlane.componentName" (dict "root" . "component" "mlflow") }}
{{- end }}

{{/* The defaults handed to the operator: explicit values win, then the in-cluster services. */}}
{{- define "flowlane.defaultCheckpointUri" -}}
{{- if .Values.defaults.checkpointUri }}
{{- .Values.defaults.checkpointUri }}
{{- else if .Values.minio.enabled }}
{{- printf "s3://%s/" .Values.minio.buckets.checkpoints }}
{{- end }}
{{- end }}

{{- define "flowlane.defaultS3Endpoint" -}}
{{- if .Values.defaults.s3.endpoint }}
{{- .Values.defaults.s3.endpoint }}
{{- else if .Values.minio.enabled }}
{{- include "flowlane.minio.endpoint" . }}
{{- end }}
{{- end }}

{{- define "flowlane.defaultS3CredentialsSecret" -}}
{{- if .Values.defaults.s3.credentialsSecret }}
{{- .Values.defaults.s3.credentialsSecret }}
{{- else if .Values.minio.enabled }}
{{- include "flowlane.minio.secretName" . }}
{{- end }}
{{- end }}

{{- define "flowlane.defaultMlflowUri" -}}
{{- if .Values.defaults.mlflowUri }}
{{- .Values.defaults.mlflowUri }}
{{- else if .Values.mlflow.enabled }}
{{- printf "http://%s.%s.svc:5000" (include "flowlane.mlflow.name" .) .Release.Namespace }}
{{- end }}
{{- end }}

{{/* The CRD group the operator's resources live in (see crds/). */}}
{{- define "flowlane.apiGroup" -}}
flowlane.dev
{{- end }}

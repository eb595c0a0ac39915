{{/* Names, labels and the derived settings shared by the templates. */}}

{{- define "finetuner.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/* <release>-finetuner, or <release> when it already holds the chart name; 40 characters leave room for suffixes. */}}
{{- define "finetuner.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "finetuner.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "finetuner.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: finetuner
{{- end }}

{{- define "finetuner.operatorSelector" -}}
app.kubernetes.io/name: {{ include "finetuner.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "finetuner.operatorServiceAccount" -}}
{{- default (printf "%s-operator" (include "finetuner.fullname" .)) .Values.operator.serviceAccount.name }}
{{- end }}

{{- define "finetuner.trainerServiceAccount" -}}
{{- default (printf "%s-trainer" (include "finetuner.fullname" .)) .Values.trainer.serviceAccount.name }}
{{- end }}

{{/* An image reference; refuses "latest" so that a restarted pod runs the same code. */}}
{{- define "finetuner.image" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag }}
{{- if eq $tag "latest" }}
{{- fail (printf "%s.image.tag \"latest\" is not allowed: pin a version (e.g. %s) so that every pod of a run uses the same image" .which .root.Chart.AppVersion) }}
{{- end }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}

{{/* Namespaces where runs are submitted, as a JSON list: `namespaces`, or the release namespace. */}}
{{- define "finetuner.runNamespaces" -}}
{{- if .Values.namespaces }}
{{- toJson .Values.namespaces }}
{{- else }}
{{- toJson (list .Release.Namespace) }}
{{- end }}
{{- end }}

{{/* Run namespaces plus the release namespace (the operator reads the object store too). */}}
{{- define "finetuner.secretNamespaces" -}}
{{- $namespaces := include "finetuner.runNamespaces" . | fromJsonArray }}
{{- toJson (append $namespaces .Release.Namespace | uniq) }}
{{- end }}

{{/* The object-store credentials Secret name, or "" for ambient identity (IRSA, workload identity). */}}
{{- define "finetuner.objectStoreSecret" -}}
{{- $credentials := .Values.objectStore.credentials }}
{{- if and $credentials.existingSecret (or $credentials.accessKeyId $credentials.secretAccessKey) }}
{{- fail "objectStore.credentials: set either existingSecret or accessKeyId/secretAccessKey, not both" }}
{{- end }}
{{- if and (or $credentials.accessKeyId $credentials.secretAccessKey) (not (and $credentials.accessKeyId $credentials.secretAccessKey)) }}
{{- fail "objectStore.credentials: accessKeyId and secretAccessKey go together; set both (or use existingSecret)" }}
{{- end }}
{{- if $credentials.existingSecret }}
{{- $credentials.existingSecret }}
{{- else if $credentials.accessKeyId }}
{{- printf "%s-object-store" (include "finetuner.fullname" .) }}
{{- end }}
{{- end }}

{{- define "finetuner.hfTokenSecret" -}}
{{- $token := .Values.huggingFace.token }}
{{- if and $token.existingSecret $token.value }}
{{- fail "huggingFace.token: set either existingSecret or value, not both" }}
{{- end }}
{{- if $token.existingSecret }}
{{- $token.existingSecret }}
{{- else if $token.value }}
{{- printf "%s-hf-token" (include "finetuner.fullname" .) }}
{{- end }}
{{- end }}

{{- define "finetuner.hfCacheClaim" -}}
{{- if .Values.huggingFace.cache.enabled }}
{{- default (printf "%s-hf-cache" (include "finetuner.fullname" .)) .Values.huggingFace.cache.existingClaim }}
{{- end }}
{{- end }}

{{- define "finetuner.s3Uri" -}}
{{- $prefix := trimAll "/" .prefix }}
{{- if $prefix }}
{{- printf "s3://%s/%s" .bucket $prefix }}
{{- else }}
{{- printf "s3://%s" .bucket }}
{{- end }}
{{- end }}

{{/* Name of every object: the Service name is part of Istio's CA address. */}}
{{- define "plugca.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: stable across upgrades and shared with the kustomize base. */}}
{{- define "plugca.selectorLabels" -}}
app.kubernetes.io/name: {{ include "plugca.name" . }}
{{- end -}}

{{- define "plugca.labels" -}}
{{ include "plugca.selectorLabels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "plugca.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}
{{- end -}}

{{/* Any controller that only one replica may run at a time. */}}
{{- define "plugca.leaderElection" -}}
{{- if or .Values.app.controller.rootConfigMap.enabled .Values.app.tls.istiodCertificateEnable -}}
true
{{- end -}}
{{- end -}}

{{- define "plugca.leaderElectionNamespace" -}}
{{- default .Release.Namespace .Values.app.controller.leaderElectionNamespace -}}
{{- end -}}

{{/*
Settings that would start a broken CA are refused here, with the value to
change, instead of surfacing as a crash loop.
*/}}
{{- define "plugca.validate" -}}
{{- $app := .Values.app -}}
{{- if and $app.tls.selfSigned.secretName $app.tls.cacerts.secretName -}}
{{- fail (printf "app.tls.selfSigned.secretName (%s) and app.tls.cacerts.secretName (%s) are both set: a plugged-in CA always wins, so the self-signed Secret would never be used. Set app.tls.cacerts.secretName to \"\" for a self-signed root, or drop app.tls.selfSigned.secretName." $app.tls.selfSigned.secretName $app.tls.cacerts.secretName) -}}
{{- end -}}
{{- if and (gt (int .Values.replicaCount) 1) (not $app.tls.cacerts.secretName) (not $app.tls.selfSigned.secretName) -}}
{{- fail (printf "replicaCount is %d but no CA is plugged in (app.tls.cacerts.secretName is empty): every replica would generate its own root and workloads would not trust each other. Plug in a cacerts Secret, keep the self-signed root in a Secret all replicas share (app.tls.selfSigned.secretName), or set replicaCount to 1." (int .Values.replicaCount)) -}}
{{- end -}}
{{- if lt (int .Values.terminationGracePeriodSeconds) (add (int $app.server.drainTimeoutSeconds) 5 | int) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least app.server.drainTimeoutSeconds + 5 (%d): the kubelet would kill plugca while it drains in-flight requests." (int .Values.terminationGracePeriodSeconds) (add (int $app.server.drainTimeoutSeconds) 5 | int)) -}}
{{- end -}}
{{- end -}}

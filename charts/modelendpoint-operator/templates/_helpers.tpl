{{/* Chart name, overridable by nameOverride. */}}
{{- define "mep.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name prefix of every resource: <release>-<chart>, or the release name when it contains the chart name. */}}
{{- define "mep.fullname" -}}
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

{{- define "mep.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "mep.labels" -}}
helm.sh/chart: {{ include "mep.chart" . }}
{{ include "mep.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: modelendpoint
{{- end }}

{{/* Labels selecting the operator pods (immutable once installed). */}}
{{- define "mep.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mep.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mep.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mep.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mep.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "mep.peeringName" -}}
{{- default (include "mep.fullname" .) .Values.peering.name }}
{{- end }}

{{/* true when the operator watches every namespace. */}}
{{- define "mep.clusterWide" -}}
{{- if empty .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/* The gateway: its own name label, so that no selector of the operator's matches its pods. */}}
{{- define "mep.gatewayName" -}}
{{- printf "%s-gateway" (include "mep.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mep.gatewaySelectorLabels" -}}
app.kubernetes.io/name: modelendpoint-gateway
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mep.gatewayLabels" -}}
helm.sh/chart: {{ include "mep.chart" . }}
{{ include "mep.gatewaySelectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: gateway
app.kubernetes.io/part-of: modelendpoint
{{- end }}

{{/* The gateway is reachable from outside the cluster (its Ingress, or a LoadBalancer or NodePort
Service): it serves a keyless ModelEndpoint only with allowUnauthenticated: true. "true" or "false". */}}
{{- define "mep.gatewayPublic" -}}
{{- $g := .Values.gateway -}}
{{- and $g.enabled (or $g.ingress.enabled (has $g.service.type (list "LoadBalancer" "NodePort"))) -}}
{{- end }}

{{- define "mep.gatewayServiceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (include "mep.gatewayName" .) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- required "gateway.serviceAccount.name is required when gateway.serviceAccount.create is false" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mep.gatewayImage" -}}
{{- printf "%s:%s" (.Values.gateway.image.repository | default .Values.image.repository) (.Values.gateway.image.tag | default .Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

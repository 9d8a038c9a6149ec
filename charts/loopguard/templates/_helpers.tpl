{{/* The chart's name, overridable. */}}
{{- define "loopguard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The full name: the release name, suffixed with the chart's unless it already contains it. */}}
{{- define "loopguard.fullname" -}}
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

{{- define "loopguard.controller.name" -}}
{{- printf "%s-controller" (include "loopguard.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loopguard.agent.name" -}}
{{- printf "%s-agent" (include "loopguard.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "loopguard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "loopguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: loopguard
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "agent"). */}}
{{- define "loopguard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loopguard.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "loopguard.componentLabels" -}}
{{ include "loopguard.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The image reference: registry (global.imageRegistry, else image.registry) and repository, by
digest when one is given, else by tag (the appVersion by default). A repository that names its own
registry (its first part has a dot or a colon, or is localhost) is taken as it is. */}}
{{- define "loopguard.image" -}}
{{- $repo := .Values.image.repository }}
{{- $first := splitList "/" $repo | first }}
{{- $registry := default .Values.image.registry ((.Values.global).imageRegistry) }}
{{- if or (contains "." $first) (contains ":" $first) (eq $first "localhost") (not $registry) }}
{{- $registry = "" }}
{{- end }}
{{- $ref := ternary $repo (printf "%s/%s" $registry $repo) (eq $registry "") }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $ref .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $ref (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* A pod's securityContext from the controller's values, for the Pods that run as the controller
does (the hooks, the evidence Job): with fsGroup = runAsGroup when `fsGroup` is asked for. */}}
{{- define "loopguard.controllerPodSecurityContext" -}}
{{- $sc := deepCopy .ctx.Values.controller.podSecurityContext }}
{{- if and .fsGroup (hasKey $sc "runAsGroup") (not (hasKey $sc "fsGroup")) }}
{{- $_ := set $sc "fsGroup" $sc.runAsGroup }}
{{- end }}
{{- if .ctx.Values.openshift.enabled }}
{{- $sc = omit $sc "runAsUser" "runAsGroup" "fsGroup" }}
{{- end }}
{{- toYaml $sc }}
{{- end }}

{{/* The controller container's securityContext; on OpenShift without the UID (restricted-v2
assigns it). */}}
{{- define "loopguard.controllerContainerSecurityContext" -}}
{{- $sc := deepCopy .Values.controller.containerSecurityContext }}
{{- if .Values.openshift.enabled }}
{{- $sc = omit $sc "runAsUser" "runAsGroup" }}
{{- end }}
{{- toYaml $sc }}
{{- end }}

{{/* Environment both components share. */}}
{{- define "loopguard.commonEnv" -}}
- name: LOOPGUARD_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- with .Values.logLevel }}
- name: RUST_LOG
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/* The agent's ServiceAccount user name, as the API server sees its tokens. */}}
{{- define "loopguard.agent.username" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "loopguard.agent.name" .) }}
{{- end }}

{{/*
The metrics port and the probes on it, for a container; the argument is the port number.
/healthz and /readyz are served next to /metrics.
*/}}
{{- define "loopguard.metricsEndpoint" -}}
ports:
  - name: metrics
    containerPort: {{ . }}
    protocol: TCP
livenessProbe:
  httpGet:
    path: /healthz
    port: metrics
  initialDelaySeconds: 5
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /readyz
    port: metrics
  periodSeconds: 5
  failureThreshold: 3
{{- end }}

{{/* A label map as a label selector string: k1=v1,k2=v2 (sorted). */}}
{{- define "loopguard.labelSelector" -}}
{{- $pairs := list }}
{{- range $k, $v := . }}
{{- $pairs = append $pairs (printf "%s=%s" $k $v) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{/* `ADDRESS:PORT` for --metrics-addr, brackets around an IPv6 address; `hostIP`: the node's address
from the downward API (the HOST_IP variable the agent's container defines). */}}
{{- define "loopguard.bindAddress" -}}
{{- $addr := index . 0 }}{{- $port := index . 1 }}
{{- if eq $addr "hostIP" }}{{ printf "$(HOST_IP):%v" $port }}
{{- else if contains ":" $addr }}{{ printf "[%s]:%v" $addr $port }}{{ else }}{{ printf "%s:%v" $addr $port }}{{ end }}
{{- end }}

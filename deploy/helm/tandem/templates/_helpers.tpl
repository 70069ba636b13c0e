{{/* Names, labels and the pod parts that the router and the Ray pods share. */}}

{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-tandem, or the release name when it already contains the chart name. */}}
{{- define "tandem.fullname" -}}
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

{{- define "tandem.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component (router, ray-head, ray-worker); call with (list . "router"). */}}
{{- define "tandem.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "tandem.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "tandem.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The head's Service; the router joins the Ray cluster through it. */}}
{{- define "tandem.rayHeadService" -}}
{{- printf "%s-ray-head" (include "tandem.fullname" .) }}
{{- end }}

{{/* Where the image keeps the embedded default model (Dockerfile: tandem make-model). */}}
{{- define "tandem.embeddedModelPath" -}}
/opt/tandem/models/tandem-tiny-stories-v1
{{- end }}

{{/* The checkpoint directory every pod loads: tandem serve --model. */}}
{{- define "tandem.modelPath" -}}
{{- if eq .Values.model.source "embedded" }}
{{- include "tandem.embeddedModelPath" . }}
{{- else }}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) (required "model.dir must name the checkpoint directory inside the model volume" .Values.model.dir) }}
{{- end }}
{{- end }}

{{/* Pod volumes: /tmp (the root filesystem is read-only) and the model. */}}
{{- define "tandem.volumes" -}}
- name: tmp
  emptyDir: {}
{{- $model := .Values.model }}
{{- if eq $model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ required "model.pvc.claimName is required when model.source is pvc" $model.pvc.claimName }}
    readOnly: true
{{- else if eq $model.source "hostPath" }}
- name: model
  hostPath:
    path: {{ required "model.hostPath.path is required when model.source is hostPath" $model.hostPath.path }}
    type: Directory
{{- else if eq $model.source "copy" }}
- name: model
  emptyDir:
    sizeLimit: {{ $model.copy.sizeLimit }}
{{- end }}
{{- end }}

{{/* Container mounts of the volumes above; the model is read-only everywhere. */}}
{{- define "tandem.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if ne .Values.model.source "embedded" }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* With model.source copy: the init container that fills the model volume. */}}
{{- define "tandem.initContainers" -}}
{{- $copy := .Values.model.copy }}
{{- if eq .Values.model.source "copy" }}
- name: copy-model
  image: {{ required "model.copy.image is required when model.source is copy" $copy.image }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if not $copy.command }}
  {{- fail "model.copy.command is required when model.source is copy: a command that fills $MODEL_DIR" }}
  {{- end }}
  command: {{- toYaml $copy.command | nindent 4 }}
  env:
    - name: MODEL_DIR
      value: {{ include "tandem.modelPath" . }}
    - name: HOME
      value: /tmp
    {{- with $copy.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  resources: {{- toYaml $copy.resources | nindent 4 }}
  securityContext: {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    - name: model
      mountPath: {{ .Values.model.mountPath }}
{{- end }}
{{- end }}

{{/* Environment of the router and the Ray containers: no downloads, writable paths under /tmp. */}}
{{- define "tandem.env" -}}
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
- name: HOME
  value: /tmp
- name: TRITON_CACHE_DIR
  value: /tmp/triton
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The Ray resource that marks GPUs of a type, as proto.plan.ray_resource_name: A100-80GB -> GPU_A100_80GB. */}}
{{- define "tandem.rayGpuResource" -}}
{{- printf "GPU_%s" (regexReplaceAll "[^A-Za-z0-9]" . "_" | upper) }}
{{- end }}

{{/*
Fails the render when the worker groups cannot hold the plan: every GPU type the plan uses
needs at least as many GPUs in worker pods of that type, in pods large enough for an instance
(tp x pp GPUs of one instance stay in one pod).
*/}}
{{- define "tandem.checkPlanFits" -}}
{{- if .Values.plan }}
{{- $plan := fromYaml .Values.plan }}
{{- if hasKey $plan "Error" }}
{{- fail (printf "plan: not a YAML plan file: %s" $plan.Error) }}
{{- end }}
{{- if $plan.stages }}
{{- fail "plan: layer-split plans (plan.stages) cannot be served by tandem serve yet; plan with instance groups" }}
{{- end }}
{{- $need := dict }}
{{- $largest := dict }}
{{- range $plan.groups }}
{{- $_ := set $need .gpu_type (add (get $need .gpu_type | default 0) (mul .count .tp .pp)) }}
{{- $_ := set $largest .gpu_type (max (get $largest .gpu_type | default 0) (mul .tp .pp)) }}
{{- end }}
{{- $have := dict }}
{{- $podMax := dict }}
{{- range .Values.workerGroups }}
{{- if .gpuType }}
{{- $_ := set $have .gpuType (add (get $have .gpuType | default 0) (mul .replicas .gpusPerPod)) }}
{{- $_ := set $podMax .gpuType (max (get $podMax .gpuType | default 0) .gpusPerPod) }}
{{- end }}
{{- end }}
{{- range $type, $num := $need }}
{{- if lt (int (get $have $type | default 0)) (int $num) }}
{{- fail (printf "workerGroups: the plan runs instances on %d %s GPUs, the worker groups with gpuType %s have %d" (int $num) $type $type (int (get $have $type | default 0))) }}
{{- end }}
{{- if lt (int (get $podMax $type | default 0)) (int (get $largest $type)) }}
{{- fail (printf "workerGroups: an instance of the plan on %s needs %d GPUs in one pod, the largest %s pods have %d" $type (int (get $largest $type)) $type (int (get $podMax $type | default 0))) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The router's health probe: GET /health (HTTPS under TLS), or a TCP connect under mTLS. */}}
{{- define "tandem.healthProbe" -}}
{{- if .Values.security.tls.clientCASecretName -}}
tcpSocket:
  port: http
{{- else -}}
httpGet:
  path: /health
  port: http
  {{- if .Values.security.tls.secretName }}
  scheme: HTTPS
  {{- end }}
{{- end }}
{{- end }}

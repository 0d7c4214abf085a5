{{/* vim: set filetype=mustache: */}}

{{- define "dispatcher.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: release-chart, or the release alone when it already holds the chart name. */}}
{{- define "dispatcher.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "dispatcher.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Usage: include "dispatcher.labels" (dict "root" $ "component" "gateway") */}}
{{- define "dispatcher.labels" -}}
helm.sh/chart: {{ include "dispatcher.chart" .root }}
{{ include "dispatcher.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: dispatcher
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "dispatcher.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dispatcher.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- with .model }}
dispatcher.io/model: {{ . }}
{{- end }}
{{- end -}}

{{/* metadata.annotations from commonAnnotations; call without nindent: it starts its own line. */}}
{{- define "dispatcher.annotations" -}}
{{- with .Values.commonAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- end -}}

{{- define "dispatcher.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dispatcher.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Image of a dispatcher component: the tag defaults to the chart appVersion. */}}
{{- define "dispatcher.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag | toString) -}}
{{- end -}}

{{/* The old values used "ressources"; a non-empty old key wins over the new default. */}}
{{- define "dispatcher.resources" -}}
{{- if .ressources -}}
{{- toYaml .ressources -}}
{{- else if .resources -}}
{{- toYaml .resources -}}
{{- else -}}
{}
{{- end -}}
{{- end -}}

{{/*
A generated secret value that survives upgrades: reuse the one in the cluster if any.
Usage: include "dispatcher.secretValue" (dict "root" $ "secret" NAME "key" KEY "value" GIVEN)
*/}}
{{- define "dispatcher.secretValue" -}}
{{- if .value -}}
{{- .value | toString | b64enc -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .secret -}}
{{- if and $existing (hasKey (default dict $existing.data) .key) -}}
{{- index $existing.data .key -}}
{{- else -}}
{{- randAlphaNum 32 | b64enc -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------- RabbitMQ */}}

{{- define "dispatcher.rabbitmq.clusterName" -}}
{{- default (printf "%s-rabbitmq" (include "dispatcher.fullname" .)) .Values.rabbitmq.cluster.name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "dispatcher.rabbitmq.host" -}}
{{- if .Values.rabbitmq.internal -}}
{{- printf "%s.%s.svc" (include "dispatcher.rabbitmq.clusterName" .) .Release.Namespace -}}
{{- else -}}
{{- required "rabbitmq.host is required when rabbitmq.internal is false" .Values.rabbitmq.host -}}
{{- end -}}
{{- end -}}

{{/* Secret with the RabbitMQ user and password: the operator's default-user one, an existing one, or ours. */}}
{{- define "dispatcher.rabbitmq.secretName" -}}
{{- if .Values.rabbitmq.internal -}}
{{- printf "%s-default-user" (include "dispatcher.rabbitmq.clusterName" .) -}}
{{- else if .Values.rabbitmq.auth.existingSecret -}}
{{- .Values.rabbitmq.auth.existingSecret -}}
{{- else -}}
{{- printf "%s-rabbitmq" (include "dispatcher.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "dispatcher.rabbitmq.userKey" -}}
{{- if or .Values.rabbitmq.internal (not .Values.rabbitmq.auth.existingSecret) -}}username{{- else -}}{{ .Values.rabbitmq.auth.existingSecretUserKey }}{{- end -}}
{{- end -}}

{{- define "dispatcher.rabbitmq.passwordKey" -}}
{{- if or .Values.rabbitmq.internal (not .Values.rabbitmq.auth.existingSecret) -}}password{{- else -}}{{ .Values.rabbitmq.auth.existingSecretPasswordKey }}{{- end -}}
{{- end -}}

{{/* "/" is the default vhost and needs no path; others are URL-escaped. */}}
{{- define "dispatcher.rabbitmq.vhostPath" -}}
{{- if eq (toString .Values.rabbitmq.vhost) "/" -}}/{{- else -}}/{{ .Values.rabbitmq.vhost | urlquery }}{{- end -}}
{{- end -}}

{{/* Env of the AMQP and stream URLs: the password stays in its Secret and is expanded by the kubelet. */}}
{{- define "dispatcher.env.rabbitmq" -}}
- name: RABBITMQ_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ include "dispatcher.rabbitmq.secretName" . }}
      key: {{ include "dispatcher.rabbitmq.userKey" . }}
- name: RABBITMQ_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "dispatcher.rabbitmq.secretName" . }}
      key: {{ include "dispatcher.rabbitmq.passwordKey" . }}
- name: DISPATCHER_AMQP_URL
  value: {{ printf "amqp://$(RABBITMQ_USERNAME):$(RABBITMQ_PASSWORD)@%s:%d%s" (include "dispatcher.rabbitmq.host" .) (int .Values.rabbitmq.port) (include "dispatcher.rabbitmq.vhostPath" .) | quote }}
{{- if .Values.config.usage.enabled }}
- name: DISPATCHER_USAGE_STREAM_URL
  value: {{ printf "rabbitmq-stream://$(RABBITMQ_USERNAME):$(RABBITMQ_PASSWORD)@%s:%d%s" (include "dispatcher.rabbitmq.host" .) (int .Values.rabbitmq.streamPort) (include "dispatcher.rabbitmq.vhostPath" .) | quote }}
- name: DISPATCHER_USAGE_STREAM_NAME
  value: {{ .Values.config.usage.streamName | quote }}
- name: DISPATCHER_USAGE_MAX_AGE
  value: {{ .Values.config.usage.maxAge | quote }}
- name: DISPATCHER_USAGE_MAX_BYTES
  value: {{ .Values.config.usage.maxBytes | int64 | toString | quote }}
{{- end }}
{{- end -}}

{{/* ---------------------------------------------------------------- Database */}}

{{- define "dispatcher.database.port" -}}
{{- if .Values.database.port -}}{{ int .Values.database.port }}{{- else if eq .Values.database.type "postgresql" -}}5432{{- else -}}3306{{- end -}}
{{- end -}}

{{- define "dispatcher.database.host" -}}
{{- if .Values.database.internal -}}
{{- printf "%s-database" (include "dispatcher.fullname" .) -}}
{{- else -}}
{{- required "database.host is required when database.internal is false" .Values.database.host -}}
{{- end -}}
{{- end -}}

{{- define "dispatcher.database.secretName" -}}
{{- default (printf "%s-database" (include "dispatcher.fullname" .)) .Values.database.auth.existingSecret -}}
{{- end -}}

{{- define "dispatcher.database.passwordKey" -}}
{{- if .Values.database.auth.existingSecret -}}{{ .Values.database.auth.existingSecretPasswordKey }}{{- else -}}password{{- end -}}
{{- end -}}

{{- define "dispatcher.database.rootPasswordKey" -}}
{{- if .Values.database.auth.existingSecret -}}{{ .Values.database.auth.existingSecretRootPasswordKey }}{{- else -}}root-password{{- end -}}
{{- end -}}

{{- define "dispatcher.env.database" -}}
- name: DATABASE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "dispatcher.database.secretName" . }}
      key: {{ include "dispatcher.database.passwordKey" . }}
- name: DISPATCHER_DATABASE_URL
  {{- $driver := ternary "postgresql+asyncpg" "mysql+aiomysql" (eq .Values.database.type "postgresql") }}
  value: {{ printf "%s://%s:$(DATABASE_PASSWORD)@%s:%s/%s" $driver .Values.database.auth.username (include "dispatcher.database.host" .) (include "dispatcher.database.port" .) .Values.database.auth.database | quote }}
{{- end -}}

{{/* ---------------------------------------------------------------- Redis */}}

{{- define "dispatcher.redis.host" -}}
{{- if .Values.redis.internal -}}
{{- printf "%s-redis" (include "dispatcher.fullname" .) -}}
{{- else -}}
{{- required "redis.host is required when redis.internal is false" .Values.redis.host -}}
{{- end -}}
{{- end -}}

{{- define "dispatcher.redis.secretName" -}}
{{- default (printf "%s-redis" (include "dispatcher.fullname" .)) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{- define "dispatcher.redis.passwordKey" -}}
{{- if .Values.redis.auth.existingSecret -}}{{ .Values.redis.auth.existingSecretPasswordKey }}{{- else -}}redis-password{{- end -}}
{{- end -}}

{{- define "dispatcher.env.redis" -}}
{{- if and .Values.redis.enabled .Values.redis.auth.enabled -}}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "dispatcher.redis.secretName" . }}
      key: {{ include "dispatcher.redis.passwordKey" . }}
- name: DISPATCHER_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:%d/%d" (include "dispatcher.redis.host" .) (int .Values.redis.port) (int .Values.redis.db) | quote }}
{{- else if .Values.redis.enabled -}}
- name: DISPATCHER_REDIS_URL
  value: {{ printf "redis://%s:%d/%d" (include "dispatcher.redis.host" .) (int .Values.redis.port) (int .Values.redis.db) | quote }}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------- Shared settings */}}

{{- define "dispatcher.env.common" -}}
- name: DISPATCHER_LOG_LEVEL
  value: {{ .Values.config.logLevel | quote }}
- name: DISPATCHER_LOG_FORMAT
  value: {{ .Values.config.logFormat | quote }}
- name: DISPATCHER_QUEUE_TIMEOUT
  value: {{ .Values.config.queueTimeout | toString | quote }}
- name: DISPATCHER_EXPRESS_PRIORITY
  value: {{ .Values.config.expressPriority | toString | quote }}
{{- end -}}

{{/* ---------------------------------------------------------------- vLLM and models */}}

{{- define "dispatcher.vllm.secretName" -}}
{{- default (printf "%s-vllm" (include "dispatcher.fullname" .)) .Values.inferenceserver.apiKey.existingSecret -}}
{{- end -}}

{{- define "dispatcher.vllm.secretKey" -}}
{{- if .Values.inferenceserver.apiKey.existingSecret -}}{{ .Values.inferenceserver.apiKey.existingSecretKey }}{{- else -}}api-key{{- end -}}
{{- end -}}

{{- define "dispatcher.huggingface.secretName" -}}
{{- default (printf "%s-huggingface" (include "dispatcher.fullname" .)) .Values.huggingface.existingSecret -}}
{{- end -}}

{{- define "dispatcher.huggingface.secretKey" -}}
{{- if .Values.huggingface.existingSecret -}}{{ .Values.huggingface.existingSecretKey }}{{- else -}}token{{- end -}}
{{- end -}}

{{/*
The models to deploy, each with its defaults filled in: `models`, or the single top-level `model`.
Usage: $ctx := dict "root" $ ; include "dispatcher.models" $ctx ; then $ctx.models is the list.
Booleans and maps are taken whole when the model sets them (no deep merge: false must stay false).
*/}}
{{- define "dispatcher.models" -}}
{{- $v := .root.Values -}}
{{- $entries := $v.models -}}
{{- if and (not $entries) $v.model -}}
{{- $entries = list (dict "name" $v.model "quantization" $v.quantization "dtype" $v.dtype) -}}
{{- end -}}
{{- $out := list -}}
{{- $seen := dict -}}
{{- range $i, $m := $entries -}}
{{- $name := required (printf "models[%d].name is required" $i) $m.name | toString -}}
{{- $slug := regexReplaceAll "[^a-z0-9]+" (lower $name) "-" | trunc 40 | trimAll "-" -}}
{{- $slug = default $slug $m.slug -}}
{{- if hasKey $seen $slug -}}
{{- fail (printf "models: two models share the object name %q; set `slug` on one of them" $slug) -}}
{{- end -}}
{{- $_ := set $seen $slug true -}}
{{- $is := $v.inferenceserver -}}
{{- $resources := include "dispatcher.resources" $is | fromYaml -}}
{{- if or $m.resources $m.ressources -}}
{{- $resources = include "dispatcher.resources" $m | fromYaml -}}
{{- end -}}
{{- $autoscaling := deepCopy $v.autoscaling -}}
{{- range $k, $val := (default dict $m.autoscaling) -}}
{{- $_ := set $autoscaling $k $val -}}
{{- end -}}
{{- $spec := dict
  "name" $name
  "slug" $slug
  "source" (default $name $m.source)
  "quantization" (default "" $m.quantization)
  "dtype" (default "" $m.dtype)
  "replicaCount" (ternary $m.replicaCount $is.replicaCount (hasKey $m "replicaCount"))
  "resources" $resources
  "extraArgs" (concat (default list $is.extraArgs) (default list $m.extraArgs))
  "env" (concat (default list $is.env) (default list $m.env))
  "maxConcurrency" (ternary $m.maxConcurrency $v.consumer.maxConcurrency (hasKey $m "maxConcurrency"))
  "reservedSlots" (ternary $m.reservedSlots $v.consumer.reservedSlots (hasKey $m "reservedSlots"))
  "priorityScheduling" (ternary $m.priorityScheduling $v.consumer.priorityScheduling (hasKey $m "priorityScheduling"))
  "nodeSelector" (ternary $m.nodeSelector $is.nodeSelector (hasKey $m "nodeSelector"))
  "tolerations" (ternary $m.tolerations $is.tolerations (hasKey $m "tolerations"))
  "affinity" (ternary $m.affinity $is.affinity (hasKey $m "affinity"))
  "autoscaling" $autoscaling
-}}
{{- $out = append $out $spec -}}
{{- end -}}
{{- $_ := set . "models" $out -}}
{{- end -}}

{{- define "dispatcher.model.fullname" -}}
{{- printf "%s-%s" (include "dispatcher.fullname" .root) .model.slug | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dispatcher.model.queue" -}}
{{- printf "dispatcher.model.%s" .name -}}
{{- end -}}

{{/* Fail early on values the schema cannot express. */}}
{{- define "dispatcher.validate" -}}
{{- if not .Values.rabbitmq.enabled -}}
{{- fail "rabbitmq.enabled must be true: the dispatcher queues every request in RabbitMQ. For an external broker set rabbitmq.internal=false and rabbitmq.host." -}}
{{- end -}}
{{- if and (not .Values.rabbitmq.internal) (not .Values.rabbitmq.auth.existingSecret) (not .Values.rabbitmq.auth.password) -}}
{{- fail "external RabbitMQ: set rabbitmq.auth.existingSecret, or rabbitmq.auth.user and rabbitmq.auth.password" -}}
{{- end -}}
{{- if and (not .Values.database.internal) (not .Values.database.auth.existingSecret) (not .Values.database.auth.password) -}}
{{- fail "external database: set database.auth.existingSecret or database.auth.password" -}}
{{- end -}}
{{- if and .Values.redis.enabled (not .Values.redis.internal) .Values.redis.auth.enabled (not .Values.redis.auth.existingSecret) (not .Values.redis.auth.password) -}}
{{- fail "external Redis with auth: set redis.auth.existingSecret or redis.auth.password (or redis.auth.enabled=false)" -}}
{{- end -}}
{{- end -}}

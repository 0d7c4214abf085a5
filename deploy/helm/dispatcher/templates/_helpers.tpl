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

{{/* First (or only) broker host: the stream URL and KEDA take one host. */}}
{{- define "dispatcher.rabbitmq.host" -}}
{{- if .Values.rabbitmq.internal -}}
{{- printf "%s.%s.svc" (include "dispatcher.rabbitmq.clusterName" .) .Release.Namespace -}}
{{- else if .Values.rabbitmq.hosts -}}
{{- (split ":" (first .Values.rabbitmq.hosts | toString))._0 -}}
{{- else -}}
{{- required "rabbitmq.host is required when rabbitmq.internal is false" .Values.rabbitmq.host -}}
{{- end -}}
{{- end -}}

{{/*
host:port of every broker node, comma-separated. The internal cluster keeps its one Service (it
balances over the nodes); an external cluster may list its nodes in `rabbitmq.hosts` for failover.
*/}}
{{- define "dispatcher.rabbitmq.endpoints" -}}
{{- $port := int .Values.rabbitmq.port -}}
{{- if and (not .Values.rabbitmq.internal) .Values.rabbitmq.hosts -}}
{{- $out := list -}}
{{- range .Values.rabbitmq.hosts -}}
{{- $h := toString . -}}
{{- $out = append $out (ternary $h (printf "%s:%d" $h $port) (contains ":" $h)) -}}
{{- end -}}
{{- join "," $out -}}
{{- else -}}
{{- printf "%s:%d" (include "dispatcher.rabbitmq.host" .) $port -}}
{{- end -}}
{{- end -}}

{{- define "dispatcher.rabbitmq.firstEndpoint" -}}
{{- first (splitList "," (include "dispatcher.rabbitmq.endpoints" .)) -}}
{{- end -}}

{{- define "dispatcher.rabbitmq.image" -}}
{{- default .Values.rabbitmq.image .Values.rabbitmq.cluster.image -}}
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

{{/*
Name of the topology operator's User of a role; its credentials Secret is "<name>-user-credentials".
Usage: include "dispatcher.rabbitmq.userName" (dict "root" $ "role" "gateway"|"worker"|"keda"|"ledger-reader" "model" $m)
*/}}
{{- define "dispatcher.rabbitmq.userName" -}}
{{- if eq .role "worker" -}}
{{- printf "%s-amqp-worker-%s" (include "dispatcher.fullname" .root) .model.slug -}}
{{- else -}}
{{- printf "%s-amqp-%s" (include "dispatcher.fullname" .root) .role -}}
{{- end -}}
{{- end -}}

{{/*
Credentials of a role as YAML {secret, userKey, passwordKey}: the topology operator's generated
Secret, the role's existing Secret, or the shared user.
Usage: include "dispatcher.rabbitmq.credentials" (dict "root" $ "role" "gateway"|"worker"|"keda" "model" $m) | fromYaml
*/}}
{{- define "dispatcher.rabbitmq.credentials" -}}
{{- $v := .root.Values.rabbitmq -}}
{{- $own := "" -}}
{{- if eq .role "gateway" -}}{{ $own = $v.roleSecrets.gateway }}{{- end -}}
{{- if eq .role "worker" -}}{{ $own = default $v.roleSecrets.worker .model.rabbitmqSecret }}{{- end -}}
{{- if $v.topologyOperator.enabled -}}
secret: {{ printf "%s-user-credentials" (include "dispatcher.rabbitmq.userName" .) }}
userKey: username
passwordKey: password
{{- else if $own -}}
secret: {{ $own }}
userKey: {{ $v.auth.existingSecretUserKey }}
passwordKey: {{ $v.auth.existingSecretPasswordKey }}
{{- else -}}
secret: {{ include "dispatcher.rabbitmq.secretName" .root }}
userKey: {{ include "dispatcher.rabbitmq.userKey" .root }}
passwordKey: {{ include "dispatcher.rabbitmq.passwordKey" .root }}
{{- end -}}
{{- end -}}

{{/* "/" is the default vhost and needs no path; others are URL-escaped. */}}
{{- define "dispatcher.rabbitmq.vhostPath" -}}
{{- if eq (toString .Values.rabbitmq.vhost) "/" -}}/{{- else -}}/{{ .Values.rabbitmq.vhost | urlquery }}{{- end -}}
{{- end -}}

{{/*
Env of the AMQP and stream URLs of one role: the password stays in that role's Secret and is
expanded by the kubelet. DISPATCHER_AMQP_URL is a comma-separated list (failover) with several hosts.
Usage: include "dispatcher.env.rabbitmq" (dict "root" $ "role" "gateway"|"worker" "model" $m)
*/}}
{{- define "dispatcher.env.rabbitmq" -}}
{{- $root := .root -}}
{{- $c := include "dispatcher.rabbitmq.credentials" . | fromYaml -}}
{{- $vhost := include "dispatcher.rabbitmq.vhostPath" $root -}}
{{- $urls := list -}}
{{- range split "," (include "dispatcher.rabbitmq.endpoints" $root) -}}
{{- $urls = append $urls (printf "amqp://$(RABBITMQ_USERNAME):$(RABBITMQ_PASSWORD)@%s%s" . $vhost) -}}
{{- end -}}
- name: RABBITMQ_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $c.secret }}
      key: {{ $c.userKey }}
- name: RABBITMQ_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $c.secret }}
      key: {{ $c.passwordKey }}
- name: DISPATCHER_AMQP_URL
  value: {{ join "," $urls | quote }}
{{- if $root.Values.config.usage.enabled }}
- name: DISPATCHER_USAGE_STREAM_URL
  value: {{ printf "rabbitmq-stream://$(RABBITMQ_USERNAME):$(RABBITMQ_PASSWORD)@%s:%d%s" (include "dispatcher.rabbitmq.host" $root) (int $root.Values.rabbitmq.streamPort) $vhost | quote }}
- name: DISPATCHER_USAGE_STREAM_NAME
  value: {{ $root.Values.config.usage.streamName | quote }}
- name: DISPATCHER_USAGE_MAX_AGE
  value: {{ $root.Values.config.usage.maxAge | quote }}
- name: DISPATCHER_USAGE_MAX_BYTES
  value: {{ $root.Values.config.usage.maxBytes | int64 | toString | quote }}
# The write-ahead log of unconfirmed usage records lives under $XDG_STATE_HOME: on the writable /tmp
# volume (the root filesystem is read-only), which outlives a container restart.
- name: XDG_STATE_HOME
  value: /tmp/state
{{- end }}
{{- end -}}

{{/*
Permissions of a role, as YAML {configure, write, read}: regexes on queue and exchange names.
Publishing goes through the default exchange ("amq.default"); control messages through the
fanout "dispatcher.control", bound to an exclusive server-named queue ("amq.gen-..."); the
gateway reads replies on the direct reply-to pseudo-queue "amq.rabbitmq.reply-to".
Usage: include "dispatcher.rabbitmq.permissions" (dict "root" $ "role" "gateway"|"worker"|"keda"|"ledger-reader" "model" $m "models" $ctx.models)
*/}}
{{- define "dispatcher.rabbitmq.permissions" -}}
{{- $usage := .root.Values.config.usage -}}
{{- $stream := ternary (list (regexQuoteMeta (toString $usage.streamName))) list $usage.enabled -}}
{{- $control := list "dispatcher\\.control" "amq\\.gen-.*" -}}
{{- if eq .role "gateway" -}}
{{- $queues := list -}}
{{- range .models -}}{{ $queues = append $queues (include "dispatcher.model.queueRegex" .) }}{{- end -}}
configure: {{ include "dispatcher.regexAnyOf" (concat $queues $control $stream) | quote }}
write: {{ include "dispatcher.regexAnyOf" (concat (list "amq\\.default") $control $stream) | quote }}
read: {{ include "dispatcher.regexAnyOf" (concat (list "amq\\.rabbitmq\\.reply-to") $control) | quote }}
{{- else if eq .role "worker" -}}
{{- $queues := list (include "dispatcher.model.queueRegex" .model) -}}
configure: {{ include "dispatcher.regexAnyOf" (concat $queues $control $stream) | quote }}
write: {{ include "dispatcher.regexAnyOf" (concat (list "amq\\.default") $control $stream) | quote }}
read: {{ include "dispatcher.regexAnyOf" (concat $queues $control) | quote }}
{{- else if eq .role "ledger-reader" -}}
configure: "^$"
write: "^$"
read: {{ include "dispatcher.regexAnyOf" $stream | quote }}
{{- else -}}
{{- /* keda: a passive queue.declare (the queue depth) needs vhost access, no permission. */ -}}
configure: "^$"
write: "^$"
read: "^$"
{{- end -}}
{{- end -}}

{{/* One anchored alternative of regexes: ^(a|b)$, or ^$ (nothing) for an empty list. */}}
{{- define "dispatcher.regexAnyOf" -}}
{{- if . -}}{{ printf "^(%s)$" (join "|" .) }}{{- else -}}^${{- end -}}
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

{{/* Settings the gateway and the workers must agree on: both declare the model queues. */}}
{{- define "dispatcher.env.serving" -}}
- name: DISPATCHER_QUEUE_TYPE
  value: {{ .Values.queue.type | quote }}
- name: DISPATCHER_MAX_QUEUE_LENGTH
  value: {{ .Values.sender.config.maxQueueLength | int64 | toString | quote }}
- name: DISPATCHER_PER_TOKEN_METRICS
  value: {{ .Values.metrics.perTokenLabels | toString | quote }}
{{- end -}}

{{/*
Gateway processes per pod: sender.workers, else the CPU request (or limit) rounded up to whole
cores, at least 1. Without either, 1: the CPU count the process sees is the node's, not its share.
*/}}
{{- define "dispatcher.gateway.workers" -}}
{{- $s := .Values.sender -}}
{{- if $s.workers -}}
{{- int $s.workers -}}
{{- else -}}
{{- $r := include "dispatcher.resources" $s | fromYaml -}}
{{- $cpu := toString (dig "requests" "cpu" (dig "limits" "cpu" "" $r) $r) -}}
{{- if not $cpu -}}
1
{{- else if hasSuffix "m" $cpu -}}
{{- max 1 (divf (trimSuffix "m" $cpu | float64) 1000 | ceil | int) -}}
{{- else -}}
{{- max 1 ($cpu | float64 | ceil | int) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Secret with the key the workers derive per-tenant cache salts from. */}}
{{- define "dispatcher.cacheSalt.secretName" -}}
{{- default (printf "%s-cache-salt" (include "dispatcher.fullname" .)) .Values.consumer.config.cacheSaltKey.existingSecret -}}
{{- end -}}

{{- define "dispatcher.cacheSalt.secretKey" -}}
{{- if .Values.consumer.config.cacheSaltKey.existingSecret -}}{{ .Values.consumer.config.cacheSaltKey.existingSecretKey }}{{- else -}}cache-salt-key{{- end -}}
{{- end -}}

{{/* Configured model names, comma-separated (DISPATCHER_MODELS). */}}
{{- define "dispatcher.modelNames" -}}
{{- $ctx := dict "root" . -}}
{{- include "dispatcher.models" $ctx -}}
{{- $names := list -}}
{{- range $ctx.models }}{{ $names = append $names .name }}{{ end -}}
{{- join "," $names -}}
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
  "rabbitmqSecret" (default "" $m.rabbitmqSecret)
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

{{/* A model's queues (normal and express) as a regex on queue names. */}}
{{- define "dispatcher.model.queueRegex" -}}
{{- printf "dispatcher\\.model\\.%s(\\.express)?" (regexQuoteMeta .name) -}}
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

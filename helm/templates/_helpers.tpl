{{/*
Chart name, for the app.kubernetes.io/name label.
*/}}
{{- define "rlhf-jobs.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fullname: the RayJob's name and the prefix of the other objects' names.
The release name (rlhf-sft, exp1-ppo) already says what runs, so it is used as is.
KubeRay rejects RayJob names longer than 47 characters (it appends 6 to name the RayCluster,
and derives pod names from that), so truncate to 47.
*/}}
{{- define "rlhf-jobs.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 47 | trimSuffix "-" }}
{{- end }}

{{/*
Chart label value.
*/}}
{{- define "rlhf-jobs.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The stage registry as JSON: files/stages.json, generated from rlhf_jobs/core/stages.py by `make schema` (a test fails
when it is stale). {"stages": [{"name": "sft", "inputs": {}}, ...]} in pipeline order; `inputs` maps a General
key to the earlier stage whose final model it reads (PPO: model_pretrain -> sft, rm_pretrain -> rm).
Use: $registry := include "rlhf-jobs.registry" . | fromJson
*/}}
{{- define "rlhf-jobs.registry" -}}
{{- $text := .Files.Get "files/stages.json" }}
{{- if not $text }}
{{- fail "the chart has no files/stages.json (the stage registry): run `make schema`" }}
{{- end }}
{{- $text }}
{{- end }}

{{/*
The registry's stage names, in pipeline order, joined by spaces ("sft rm ppo").
*/}}
{{- define "rlhf-jobs.stageNames" -}}
{{- $names := list }}
{{- range (include "rlhf-jobs.registry" . | fromJson).stages }}
{{- $names = append $names .name }}
{{- end }}
{{- join " " $names }}
{{- end }}

{{/*
The stage: .Values.stage, else the release name's suffix (-sft, -rm, -ppo: the registry's stages), else fail.
*/}}
{{- define "rlhf-jobs.stage" -}}
{{- if .Values.stage }}
{{- .Values.stage }}
{{- else }}
{{- $names := splitList " " (include "rlhf-jobs.stageNames" .) }}
{{- $quoted := list }}
{{- $suffixes := list }}
{{- range $names }}
{{- $quoted = append $quoted (regexQuoteMeta .) }}
{{- $suffixes = append $suffixes (printf "-%s" .) }}
{{- end }}
{{- $suffix := regexFind (printf "-(%s)$" (join "|" $quoted)) .Release.Name }}
{{- if not $suffix }}
{{- $listed := last $suffixes }}
{{- if gt (len $suffixes) 1 }}
{{- $listed = printf "%s or %s" (join ", " (initial $suffixes)) (last $suffixes) }}
{{- end }}
{{- fail (printf "cannot tell the stage: `stage` is not set and the release name %q does not end in %s. Set --set stage=%s, or name the release after the stage (e.g. helm install rlhf-%s ./helm)." .Release.Name $listed (join "|" $names) (first $names)) }}
{{- end }}
{{- trimPrefix "-" $suffix }}
{{- end }}
{{- end }}

{{/*
The first stage of the pipeline (its release creates the run's PVC with storage.create: auto).
*/}}
{{- define "rlhf-jobs.firstStage" -}}
{{- first (splitList " " (include "rlhf-jobs.stageNames" .)) }}
{{- end }}

{{/*
The stage after this release's one in the pipeline; empty for the last.
*/}}
{{- define "rlhf-jobs.nextStage" -}}
{{- $stage := include "rlhf-jobs.stage" . }}
{{- $names := splitList " " (include "rlhf-jobs.stageNames" .) }}
{{- range $index, $name := $names }}
{{- if and (eq $name $stage) (lt (add1 $index) (len $names)) }}
{{- index $names (add1 $index) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
This release's stage's inputs from the registry, as JSON: {"model_pretrain": "sft", ...} ({} for most stages).
*/}}
{{- define "rlhf-jobs.stageInputs" -}}
{{- $stage := include "rlhf-jobs.stage" . }}
{{- $inputs := dict }}
{{- range (include "rlhf-jobs.registry" . | fromJson).stages }}
{{- if eq .name $stage }}
{{- $inputs = .inputs }}
{{- end }}
{{- end }}
{{- toJson $inputs }}
{{- end }}

{{/*
The trainer's rules across this stage's config keys (files/stages.json `checks`, generated from
rlhf_jobs/tools/chart_rules.py, where each one's kind is explained), applied to the rendered config: what the
trainer would refuse at start fails here, with its message. Operand: the first of its keys that is set (a key the
config lacks has its default); "set and not zero" is Python's truthiness of a number.
*/}}
{{- define "rlhf-jobs.checkConfig" -}}
{{- $stage := include "rlhf-jobs.stage" . }}
{{- $config := include "rlhf-jobs.trainingConfig" . | fromYaml }}
{{- range (include "rlhf-jobs.registry" . | fromJson).stages }}
{{- if eq .name $stage }}
{{- range .checks }}
{{- $section := get $config .section | default dict }}
{{- $operands := dict }}
{{- $check := . }}
{{- range $name := list "a" "b" }}
{{- range $key := get $check $name }}
{{- $value := ternary (get $section $key) (get $check.defaults $key) (hasKey $section $key) }}
{{- if and (not (hasKey $operands $name)) (not (kindIs "invalid" $value)) }}
{{- $_ := set $operands $name $value }}
{{- end }}
{{- end }}
{{- end }}
{{- $a := get $operands "a" }}
{{- $b := get $operands "b" }}
{{- $aSet := and (hasKey $operands "a") (ne (float64 $a) 0.0) }}
{{- $bSet := and (hasKey $operands "b") (ne (float64 $b) 0.0) }}
{{- $broken := false }}
{{- if eq .kind "not_both" }}
{{- $broken = and $aSet $bSet }}
{{- else if eq .kind "one_of" }}
{{- $broken = not (or (hasKey $operands "a") (hasKey $operands "b")) }}
{{- else if eq .kind "at_most" }}
{{- $broken = and $aSet $bSet (gt (float64 $a) (float64 $b)) }}
{{- else if eq .kind "divides" }}
{{- $broken = and $aSet $bSet (ne (mod (int64 $b) (int64 $a)) 0) }}
{{- else }}
{{- fail (printf "files/stages.json: unknown check %q: run `make schema` with this chart's rlhf-jobs" .kind) }}
{{- end }}
{{- if $broken }}
{{- $message := .message | replace "{a}" (toString $a) | replace "{b}" (toString $b) }}
{{- fail (printf "configs.%s.%s: %s (the %s trainer would refuse it at start: rlhf_jobs/core/config.py)" $stage .section $message $stage) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Selector labels (stable across upgrades).
*/}}
{{- define "rlhf-jobs.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rlhf-jobs.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels on every object and pod: app.kubernetes.io/*, helm.sh/chart, and the run/stage labels
that the submitter finds a run's objects by.
*/}}
{{- define "rlhf-jobs.labels" -}}
{{ include "rlhf-jobs.selectorLabels" . }}
app.kubernetes.io/version: {{ default .Chart.AppVersion .Values.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rlhf-jobs
helm.sh/chart: {{ include "rlhf-jobs.chart" . }}
rlhf-jobs.io/stage: {{ include "rlhf-jobs.stage" . }}
rlhf-jobs.io/run: {{ .Values.run | quote }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The image reference.
*/}}
{{- define "rlhf-jobs.image" -}}
{{- $tag := toString (default .Chart.AppVersion .Values.image.tag) }}
{{- if eq .Values.image.variant "gpu" }}{{ $tag = printf "%s-gpu" $tag }}{{ end }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "rlhf-jobs.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rlhf-jobs.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
ConfigMap name.
*/}}
{{- define "rlhf-jobs.configMapName" -}}
{{- printf "%s-config" (include "rlhf-jobs.fullname" .) }}
{{- end }}

{{/*
The reward-function files' ConfigMap (rewardFunctions), and their directory under the config mount
(/etc/rlhf-jobs/rewards: rlhf_jobs/pipeline/backends/rewards.py REWARDS_DIR, where the submitter points the config's paths).
*/}}
{{- define "rlhf-jobs.rewardsConfigMapName" -}}
{{- printf "%s-rewards" (include "rlhf-jobs.fullname" .) }}
{{- end }}

{{- define "rlhf-jobs.rewardsSubdir" -}}
rewards
{{- end }}

{{/*
Claim name of the checkpoint PVC: existingClaim, else storage.name, else rlhf-<run>-checkpoints
(the same in the three stages' releases of a run).
*/}}
{{- define "rlhf-jobs.claimName" -}}
{{- if .Values.storage.existingClaim }}
{{- .Values.storage.existingClaim }}
{{- else }}
{{- default (printf "rlhf-%s-checkpoints" .Values.run) .Values.storage.name | trunc 253 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
"true" when this release creates the PVC: never with existingClaim; `auto` = only in the first stage (sft).
*/}}
{{- define "rlhf-jobs.createPVC" -}}
{{- $create := .Values.storage.create }}
{{- if or .Values.storage.existingClaim (not (include "rlhf-jobs.usePVC" .)) }}
{{- else if eq (toString $create) "auto" }}
{{- if eq (include "rlhf-jobs.stage" .) (include "rlhf-jobs.firstStage" .) }}true{{ end }}
{{- else if eq (toString $create) "true" }}true
{{- end }}
{{- end }}

{{/*
"true" when the Ray pods mount a checkpoint PVC: always, unless storage.remote holds the run (then only with
an existingClaim, e.g. for datasets or models on a volume).
*/}}
{{- define "rlhf-jobs.usePVC" -}}
{{- if or (not .Values.storage.remote) .Values.storage.existingClaim }}true{{ end }}
{{- end }}

{{/*
Directory of this run: under storage.remote (object storage, e.g. s3://bucket/prefix) when set, else on the volume.
*/}}
{{- define "rlhf-jobs.runDir" -}}
{{- printf "%s/%s" (trimSuffix "/" (.Values.storage.remote | default .Values.storage.mountPath)) .Values.run }}
{{- end }}

{{/*
The stage's training config (YAML), with the chart's path defaults filled in: checkpoint_dir, output_dir, and
each of the stage's registry inputs (PPO's model_pretrain/rm_pretrain) from the earlier stage's checkpoint_dir.
*/}}
{{- define "rlhf-jobs.trainingConfig" -}}
{{- $stage := include "rlhf-jobs.stage" . }}
{{- $config := deepCopy (index .Values.configs $stage | default dict) }}
{{- $general := deepCopy (get $config "General" | default dict) }}
{{- $runDir := include "rlhf-jobs.runDir" . }}
{{- if not (get $general "checkpoint_dir") }}
{{- $_ := set $general "checkpoint_dir" (printf "%s/%s" $runDir $stage) }}
{{- end }}
{{- if not (get $general "output_dir") }}
{{- $_ := set $general "output_dir" (printf "%s/work/%s" $runDir $stage) }}
{{- end }}
{{- range $key, $from := include "rlhf-jobs.stageInputs" . | fromJson }}
{{- if not (get $general $key) }}
{{- if $.Values.chainStages }}
{{- $_ := set $general $key (printf "%s/%s" $runDir $from) }}
{{- else }}
{{- $_ := set $general $key nil }}
{{- end }}
{{- end }}
{{- end }}
{{- $_ := set $config "General" $general }}
{{- toYaml $config }}
{{- end }}

{{/*
sha256 of the ConfigMap's config.yaml (the rendered config plus its final newline), so that
`sha256(configmap.data["config.yaml"])` equals the rlhf-jobs.io/config-hash annotation.
*/}}
{{- define "rlhf-jobs.configHash" -}}
{{- printf "%s\n" (include "rlhf-jobs.trainingConfig" .) | sha256sum }}
{{- end }}

{{/*
The stage's Training section and resources_per_worker (dicts).
*/}}
{{- define "rlhf-jobs.resourcesPerWorker" -}}
{{- $stage := include "rlhf-jobs.stage" . }}
{{- $training := get (index .Values.configs $stage | default dict) "Training" | default dict }}
{{- toYaml (get $training "resources_per_worker" | default (dict "CPU" 1)) }}
{{- end }}

{{- define "rlhf-jobs.numWorkers" -}}
{{- $stage := include "rlhf-jobs.stage" . }}
{{- $training := get (index .Values.configs $stage | default dict) "Training" | default dict }}
{{- get $training "num_training_workers" | default 1 | int }}
{{- end }}

{{/*
A number as a Kubernetes quantity / flag string: 1 -> "1", 0.5 -> "0.5", 2147483648 -> "2147483648".
Strings (quantities like "4Gi") and booleans pass through.
*/}}
{{- define "rlhf-jobs.quantity" -}}
{{- if or (kindIs "string" .) (kindIs "bool" .) }}
{{- toString . }}
{{- else if eq (float64 .) (float64 (int64 .)) }}
{{- int64 . }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/*
Worker container resources from resources_per_worker: CPU -> cpu, GPU -> nvidia.com/gpu, memory -> memory.
Requests = limits, so worker pods get exactly what Ray Train reserves (Guaranteed QoS when memory is set).
GPUs are whole devices in Kubernetes: a fractional GPU is rounded up.
*/}}
{{- define "rlhf-jobs.workerResources" -}}
{{- $rpw := include "rlhf-jobs.resourcesPerWorker" . | fromYaml }}
{{- $list := dict }}
{{- $_ := set $list "cpu" (include "rlhf-jobs.quantity" (get $rpw "CPU" | default 1)) }}
{{- if get $rpw "memory" }}
{{- $_ := set $list "memory" (include "rlhf-jobs.quantity" (get $rpw "memory")) }}
{{- end }}
{{- if gt (get $rpw "GPU" | default 0 | float64) 0.0 }}
{{- $_ := set $list "nvidia.com/gpu" (toString (ceil (get $rpw "GPU") | int)) }}
{{- end -}}
requests:
  {{- toYaml $list | nindent 2 }}
limits:
  {{- toYaml $list | nindent 2 }}
{{- end }}

{{/*
Worker rayStartParams: num-cpus / num-gpus as Ray sees them (whole numbers, rounded up), then the user's.
*/}}
{{- define "rlhf-jobs.workerRayStartParams" -}}
{{- $rpw := include "rlhf-jobs.resourcesPerWorker" . | fromYaml }}
{{- $params := dict "num-cpus" (toString (ceil (get $rpw "CPU" | default 1) | int)) }}
{{- $_ := set $params "num-gpus" (toString (ceil (get $rpw "GPU" | default 0) | int)) }}
{{- range $key, $value := .Values.worker.rayStartParams }}
{{- $_ := set $params $key (include "rlhf-jobs.quantity" $value) }}
{{- end }}
{{- toYaml $params }}
{{- end }}

{{/*
Head rayStartParams: the dashboard on all interfaces; no CPUs/GPUs for Ray tasks unless head.allowTraining.
*/}}
{{- define "rlhf-jobs.headRayStartParams" -}}
{{- $params := dict "dashboard-host" "0.0.0.0" }}
{{- if not .Values.head.allowTraining }}
{{- $_ := set $params "num-cpus" "0" }}
{{- $_ := set $params "num-gpus" "0" }}
{{- end }}
{{- range $key, $value := .Values.head.rayStartParams }}
{{- $_ := set $params $key (include "rlhf-jobs.quantity" $value) }}
{{- end }}
{{- toYaml $params }}
{{- end }}

{{/*
Volumes of the head and worker pods: the checkpoint PVC, the config, /dev/shm, the cache ($RLHF_JOBS_CACHE_DIR).
*/}}
{{- define "rlhf-jobs.volumes" -}}
{{- if include "rlhf-jobs.usePVC" . }}
- name: checkpoints
  persistentVolumeClaim:
    claimName: {{ include "rlhf-jobs.claimName" . }}
{{- end }}
{{- if .Values.rewardFunctions }}
- name: config
  projected:
    sources:
      - configMap:
          name: {{ include "rlhf-jobs.configMapName" . }}
      # rewardFunctions, under rewards/ (one volume: a mount nested in a read-only ConfigMap mount cannot be made)
      - configMap:
          name: {{ include "rlhf-jobs.rewardsConfigMapName" . }}
          items:
            {{- range $name, $_ := .Values.rewardFunctions }}
            - key: {{ $name }}
              path: {{ include "rlhf-jobs.rewardsSubdir" $ }}/{{ $name }}
            {{- end }}
{{- else }}
- name: config
  configMap:
    name: {{ include "rlhf-jobs.configMapName" . }}
{{- end }}
{{- if .Values.shm.enabled }}
- name: dshm
  emptyDir:
    medium: Memory
    {{- with .Values.shm.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- end }}
{{- if .Values.cache.enabled }}
- name: cache
  emptyDir:
    {{- with .Values.cache.sizeLimit }}
    sizeLimit: {{ . }}
    {{- else }} {}
    {{- end }}
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "rlhf-jobs.volumeMounts" -}}
{{- if include "rlhf-jobs.usePVC" . }}
- name: checkpoints
  mountPath: {{ .Values.storage.mountPath }}
{{- end }}
- name: config
  mountPath: /etc/rlhf-jobs
  readOnly: true
{{- if .Values.shm.enabled }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- if .Values.cache.enabled }}
- name: cache
  mountPath: {{ .Values.cache.mountPath }}
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Environment of the Ray containers; `--set env[0].value=1` gives a number, Kubernetes wants a string.
*/}}
{{- define "rlhf-jobs.env" -}}
- name: RLHF_JOBS_STAGE
  value: {{ include "rlhf-jobs.stage" . | quote }}
- name: RLHF_JOBS_RUN
  value: {{ .Values.run | quote }}
- name: RLHF_JOBS_RUN_DIR
  value: {{ include "rlhf-jobs.runDir" . | quote }}
{{- if .Values.cache.enabled }}
- name: RLHF_JOBS_CACHE_DIR
  value: {{ .Values.cache.mountPath | quote }}
{{- end }}
{{- range $name, $value := dict "AWS_ENDPOINT_URL" .Values.storage.endpointURL "AWS_REGION" .Values.storage.region "MLFLOW_TRACKING_URI" .Values.tracking.mlflow.trackingURI "MLFLOW_EXPERIMENT_NAME" .Values.tracking.mlflow.experimentName "WANDB_PROJECT" .Values.tracking.wandb.project "WANDB_ENTITY" .Values.tracking.wandb.entity "WANDB_MODE" .Values.tracking.wandb.mode }}
{{- if $value }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}
{{- $env := list }}
{{- range .Values.env }}
{{- $var := deepCopy . }}
{{- if hasKey $var "value" }}
{{- $_ := set $var "value" (include "rlhf-jobs.quantity" $var.value) }}
{{- end }}
{{- $env = append $env $var }}
{{- end }}
{{- with $env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Pod spec fields every pod shares. Argument: (dict "root" $ "group" .Values.head "mountsPVC" true); `mountsPVC`:
the pod mounts the run's PVC (head and workers), so it is co-located with the run's others where the PVC needs it.
*/}}
{{- define "rlhf-jobs.podCommon" -}}
{{- $root := .root }}
{{- $group := .group -}}
serviceAccountName: {{ include "rlhf-jobs.serviceAccountName" $root }}
automountServiceAccountToken: {{ $root.Values.serviceAccount.automountServiceAccountToken }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $root.Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with merge (deepCopy ($group.nodeSelector | default dict)) ($root.Values.nodeSelector | default dict) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with concat ($root.Values.tolerations | default list) ($group.tolerations | default list) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $affinity := $group.affinity | default $root.Values.affinity }}
{{- if and .mountsPVC (include "rlhf-jobs.colocate" $root) }}
{{- $affinity = deepCopy ($affinity | default dict) }}
{{- $podAffinity := get $affinity "podAffinity" | default dict }}
{{- $terms := get $podAffinity "requiredDuringSchedulingIgnoredDuringExecution" | default list }}
{{- $_ := set $podAffinity "requiredDuringSchedulingIgnoredDuringExecution" (append $terms (include "rlhf-jobs.colocationTerm" $root | fromYaml)) }}
{{- $_ := set $affinity "podAffinity" $podAffinity }}
{{- end }}
{{- with $affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
"true" when the run's head and worker pods must run on one node: they all mount the run's PVC read-write, and a
ReadWriteOnce volume attaches to one node at a time (elsewhere: Multi-Attach, pods stuck in ContainerCreating).
storage.colocatePods `auto`: when the chart describes the PVC (not existingClaim, whose modes it cannot see) and
storage.accessModes has ReadWriteOnce and not ReadWriteMany; `true`/`false` force it.
*/}}
{{- define "rlhf-jobs.colocate" -}}
{{- $mode := toString .Values.storage.colocatePods }}
{{- $modes := .Values.storage.accessModes }}
{{- if and (include "rlhf-jobs.usePVC" .) (eq $mode "true") }}true
{{- else if and (eq $mode "auto") (include "rlhf-jobs.usePVC" .) (not .Values.storage.existingClaim) (has "ReadWriteOnce" $modes) (not (has "ReadWriteMany" $modes)) }}true
{{- end }}
{{- end }}

{{/*
The required pod affinity term that puts a run's Ray pods (every stage's head and workers) on one node.
*/}}
{{- define "rlhf-jobs.colocationTerm" -}}
labelSelector:
  matchLabels:
    rlhf-jobs.io/run: {{ .Values.run | quote }}
  matchExpressions:
    - key: app.kubernetes.io/component
      operator: In
      values: [head, worker]
topologyKey: kubernetes.io/hostname
{{- end }}

{{/*
envFrom of the Ray containers: the Secrets of storage and trackers (credentials never go into the ConfigMap),
then the user's `envFrom`.
*/}}
{{- define "rlhf-jobs.envFrom" -}}
{{- $from := list }}
{{- range (list .Values.storage.credentialsSecret .Values.tracking.mlflow.credentialsSecret .Values.tracking.wandb.apiKeySecret) }}
{{- if . }}
{{- $from = append $from (dict "secretRef" (dict "name" .)) }}
{{- end }}
{{- end }}
{{- $from = concat $from (.Values.envFrom | default list) }}
{{- with $from }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/*
Seconds a preStop hook may wait for training to stop: the grace period less 10 s, left for Ray to shut down.
*/}}
{{- define "rlhf-jobs.preStopWait" -}}
{{- max 0 (sub (int .Values.preemption.terminationGracePeriodSeconds) 10) }}
{{- end }}

{{/*
The Python module of the preStop hooks (`python -m <module>`), named here only: moving the module is a one-line
change.
*/}}
{{- define "rlhf-jobs.preemptionModule" -}}
rlhf_jobs.engine.preemption
{{- end }}

{{/*
Worker preStop: drain this pod's Ray node through the GCS (Ray Train's preemption watcher sees it and the training
loop can finish its step and checkpoint), then wait while training workers still run here, at most the grace
period less 10 s. Returns at once when no training runs (a finished job's cluster is deleted without delay); a
failed drain fails the hook at once, with the reason on stderr (a FailedPreStopHook event), instead of waiting.
*/}}
{{- define "rlhf-jobs.drainOnStop" -}}
["python", "-m", {{ include "rlhf-jobs.preemptionModule" . | quote }}, "--drain", "--wait", {{ include "rlhf-jobs.preStopWait" . | quote }}, "--deadline", {{ .Values.preemption.terminationGracePeriodSeconds | int | quote }}]
{{- end }}

{{/*
Storage values that cannot work, refused before anything is created. Every Ray pod mounts the run's PVC, and
the driver (on the head) and every training worker write under output_dir: each rank writes its own shard of
every checkpoint into output_dir/checkpoints/step-N/ (DDP and FSDP alike). So the claim must be mountable
read-write by the head and all the workers at once:
- ReadWriteOncePod: one pod only (enforced by the scheduler), and there are always at least two;
- ReadWriteOnce: one node at a time, while a required pod anti-affinity on kubernetes.io/hostname that selects
  the worker pods puts each worker on a node of its own.
Checked only for the PVC the chart describes (storage.accessModes); an existingClaim's modes are not visible here.
*/}}
{{- define "rlhf-jobs.checkStorage" -}}
{{- if and (include "rlhf-jobs.usePVC" .) (not .Values.storage.existingClaim) }}
{{- $modes := .Values.storage.accessModes }}
{{- $workers := include "rlhf-jobs.numWorkers" . | int }}
{{- if not (or (has "ReadWriteOnce" $modes) (has "ReadWriteMany" $modes) (has "ReadWriteOncePod" $modes)) }}
{{- fail (printf "storage.accessModes %v has no write mode: the head and every worker write checkpoints to the run's PVC; use ReadWriteOnce (all pods on one node) or ReadWriteMany" $modes) }}
{{- end }}
{{- if has "ReadWriteOncePod" $modes }}
{{- fail (printf "storage.accessModes [ReadWriteOncePod] lets one pod mount the run's PVC, and the head and the %d worker(s) all mount it (every rank writes its checkpoint shard there): use ReadWriteOnce (all pods on one node) or ReadWriteMany" $workers) }}
{{- end }}
{{- if and (has "ReadWriteOnce" $modes) (not (has "ReadWriteMany" $modes)) (gt $workers 1) (include "rlhf-jobs.workersOnSeparateNodes" .) }}
{{- fail (printf "storage.accessModes [ReadWriteOnce] is mounted by one node at a time, and the required podAntiAffinity on kubernetes.io/hostname in worker.affinity (or affinity) puts the %d workers on %d nodes, each writing its checkpoint shard to the PVC: use storage.accessModes [ReadWriteMany] (NFS, EFS, Filestore, CephFS...) or a preferred anti-affinity" $workers $workers) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
"true" when the worker pods' affinity has a required podAntiAffinity term on kubernetes.io/hostname whose
matchLabels select the worker pods themselves (in this namespace). Terms with matchExpressions, label keys or
namespace selectors are not interpreted (no verdict from them).
*/}}
{{- define "rlhf-jobs.workersOnSeparateNodes" -}}
{{- $affinity := .Values.worker.affinity | default .Values.affinity | default dict }}
{{- $labels := include "rlhf-jobs.labels" . | fromYaml }}
{{- $_ := set $labels "app.kubernetes.io/component" "worker" }}
{{- $labels = merge (deepCopy (.Values.worker.podLabels | default dict)) $labels }}
{{- $separate := false }}
{{- range (dig "podAntiAffinity" "requiredDuringSchedulingIgnoredDuringExecution" list $affinity) }}
{{- $selector := .labelSelector | default dict }}
{{- $plain := not (or $selector.matchExpressions .namespaceSelector .matchLabelKeys .mismatchLabelKeys) }}
{{- $here := or (not .namespaces) (has $.Release.Namespace .namespaces) }}
{{- if and (eq (toString .topologyKey) "kubernetes.io/hostname") $selector.matchLabels $plain $here }}
{{- $matches := true }}
{{- range $key, $value := $selector.matchLabels }}
{{- if ne (toString (get $labels $key)) (toString $value) }}
{{- $matches = false }}
{{- end }}
{{- end }}
{{- if $matches }}
{{- $separate = true }}
{{- end }}
{{- end }}
{{- end }}
{{- if $separate }}true{{ end }}
{{- end }}

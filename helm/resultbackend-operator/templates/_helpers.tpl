{{/* Names and labels. */}}

{{- define "rbo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rbo.fullname" -}}
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

{{- define "rbo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rbo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "rbo.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "rbo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: resultbackend-operator
{{- end -}}

{{- define "rbo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "rbo.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "rbo.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "rbo.peeringName" -}}
{{- default (include "rbo.fullname" .) .Values.peering.name -}}
{{- end -}}

{{/* True ("true") when the operator watches only watch.namespaces. */}}
{{- define "rbo.namespaced" -}}
{{- if eq .Values.watch.scope "namespaces" -}}true{{- end -}}
{{- end -}}

{{/* Checks the schema cannot express with a readable message. */}}
{{- define "rbo.validate" -}}
{{- if and (gt (int .Values.replicas) 1) (not .Values.peering.enabled) -}}
{{- fail "replicas > 1 needs peering.enabled=true: without Kopf peering every replica would handle every ResultBackend" -}}
{{- end -}}
{{- if and (include "rbo.namespaced" .) (empty .Values.watch.namespaces) -}}
{{- fail "watch.scope=namespaces needs at least one entry in watch.namespaces" -}}
{{- end -}}
{{- if and .Values.metrics.enabled (eq (int .Values.metrics.port) (int .Values.healthPort)) -}}
{{- fail "metrics.port must differ from healthPort" -}}
{{- end -}}
{{- end -}}

{{/* The namespace of ClusterResultStores' admin Secrets (--cluster-resource-namespace). */}}
{{- define "rbo.clusterResourceNamespace" -}}
{{- default .Release.Namespace .Values.clusterResourceNamespace -}}
{{- end -}}

{{/*
RBAC rules. The chart binds them with a ClusterRole (watch.scope=cluster) or with a
Role in each watched namespace (watch.scope=namespaces); see rbac.yaml.

"framework" rules are what Kopf itself needs; "application" rules are what the
operator's handlers need. The application rules are all in one place below.
*/}}

{{/* Framework, always cluster-wide (Kopf reads these across the cluster). */}}
{{- define "rbo.rules.framework.cluster" -}}
# Kopf discovers and watches CRDs, to notice ours (and the peering CRDs) appear or go.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if and (not (include "rbo.namespaced" .)) .Values.peering.enabled }}
# Cluster-wide peering: replicas keep alive in one ClusterKopfPeering.
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end -}}

{{/* Framework, in every watched namespace (or cluster-wide for scope cluster). */}}
{{- define "rbo.rules.framework.namespaced" -}}
# Kopf posts Events (kopf.event, and its own on handler failures): core/v1, create only.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if and (include "rbo.namespaced" .) .Values.peering.enabled }}
# Namespaced peering: replicas keep alive in one KopfPeering per watched namespace.
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end -}}

{{/* ===== Application rules: everything the operator's own code needs. =====
Exactly the requests the operator makes, as recorded in the apiserver's audit log while
the integration tests run it as this ServiceAccount (`devstack/rbac-audit` compares the
two; `make integration` runs it), plus resultbackends/finalizers, which only admission
checks. Three parts: in every watched namespace (a ClusterRole for watch.scope=cluster,
a Role per namespace otherwise) and cluster-scoped objects (always a ClusterRole). */}}

{{/* Application, in every watched namespace (or cluster-wide for scope cluster). */}}
{{- define "rbo.rules.application" -}}
# ResultBackends: Kopf lists and watches them; the operator patches its finalizer
# (resultstores.io/finalizer) on and off. No get: every decision is made from what
# the watch already delivered.
- apiGroups: ["resultstores.io"]
  resources: ["resultbackends"]
  verbs: ["list", "watch", "patch"]
# Status is a subresource: conditions, phase, observedGeneration (written, never read:
# the status arrives with the ResultBackend).
- apiGroups: ["resultstores.io"]
  resources: ["resultbackends/status"]
  verbs: ["patch"]
# The worker Secret has an ownerReference with blockOwnerDeletion; clusters that enable
# the OwnerReferencesPermissionEnforcement admission plugin check this permission.
- apiGroups: ["resultstores.io"]
  resources: ["resultbackends/finalizers"]
  verbs: ["update"]
# ResultStores (namespaced stores): watched, their finalizer patched on and off (a store
# in use waits), their status written (type, url, serverVersion, resultBackends, Ready).
- apiGroups: ["resultstores.io"]
  resources: ["resultstores"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["resultstores.io"]
  resources: ["resultstores/status"]
  verbs: ["patch"]
# Secrets: read a ResultStore's admin Secret (by name, in the store's namespace) and the
# worker Secret; create and update the worker Secret <name>-result-backend. Watched, so
# that a worker Secret deleted or edited is written again at once and a fixed admin
# Secret is used at once; the operator keeps no Secret it is not pointed at (only a
# hash of its own). With namespacedStores=false no admin Secret is read here.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Deleting a ResultBackend whose store is gone: only when its namespace is terminating
# does the finalizer let go. A Role in a namespace grants get on that namespace object
# itself.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get"]
# Worker workloads: watched for changes, listed per namespace to find the ones
# workers.selector matches, injected by server-side apply (a patch; no create, so an
# apply never brings back a workload deleted meanwhile). Never read one by one.
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["list", "watch", "patch"]
{{- end -}}

{{/* Application, cluster-scoped objects: always a ClusterRole. */}}
{{- define "rbo.rules.application.cluster" -}}
{{- if not (include "rbo.namespaced" .) }}
# ClusterResultStores: watched, their finalizer patched on and off (a store in use
# waits), their status written. Served with watch.scope=cluster only: operators that
# watch some namespaces would all check (and write) every ClusterResultStore of the
# cluster, each from its own cluster resource namespace.
- apiGroups: ["resultstores.io"]
  resources: ["clusterresultstores"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["resultstores.io"]
  resources: ["clusterresultstores/status"]
  verbs: ["patch"]
{{- end }}
# Namespaces: listed and watched for their labels (a ClusterResultStore's
# namespaceSelector; a relabelled namespace re-evaluates its ResultBackends). With
# watch.scope=namespaces Kopf follows the watched namespaces through them.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end -}}
{{/* ===== End of application rules. ===== */}}

{{/*
Aggregated ClusterRoles for people (aggregateRoles): who may write what follows the
built-in roles. Not bound to the operator.
*/}}
{{- define "rbo.rules.people.view" -}}
# Every kind, read-only: view, edit and admin.
- apiGroups: ["resultstores.io"]
  resources: ["resultbackends", "resultstores", "clusterresultstores"]
  verbs: ["get", "list", "watch"]
{{- end -}}

{{- define "rbo.rules.people.edit" -}}
# ResultBackends: edit and admin (a ResultBackend names no URL and no Secret).
- apiGroups: ["resultstores.io"]
  resources: ["resultbackends"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"]
{{- end -}}

{{- define "rbo.rules.people.admin" -}}
# ResultStores: admin only (a ResultStore names a server and an admin Secret).
- apiGroups: ["resultstores.io"]
  resources: ["resultstores"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"]
{{- end -}}

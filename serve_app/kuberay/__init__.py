"""Render a KubeRay `RayService` from a Serve config file: the one source of truth.

    python -m serve_app.kuberay render configs/src/gpu.yaml --overlay gpu \
        > kuberay/overlays/gpu/rayservice.yaml

What is derived from the config, so that it cannot drift:
- `serveConfigV2`: the config rendered as one application per tier and one for the router
  (`serve_app.serve_config`), with HTTP bound for the pod network and a proxy on
  every node; each tier pinned to its own worker group through a custom Ray resource
  `tier_<name>` (added to the tier's `ray_resources` unless the tier names its own), the router
  to the `router` group (resource `serve_app_router`), the only pods that mount the API keys.
- each pod's image: vLLM's (`--vllm-image`, kuberay/Dockerfile.vllm) for the worker groups of
  tiers with `engine.launcher: vllm`, whose engine runs the image's vLLM interpreter unless
  `engine.tuning.python` says otherwise; the TGI-based one (`--image`) for every other pod.
- one worker group per tier: `replicas`/`minReplicas`/`maxReplicas` from the tier's replica bounds
  (one Serve replica per pod), `nvidia.com/gpu` from `gpus_per_replica`, the tier resource
  advertised in `rayStartParams`; one `router` group with a pod per router replica.
- what a security review asks for (docs/operations.md "Kubernetes (KubeRay)"): Ray token
  authentication with the token read from a mounted Secret, secrets as files mounted only where
  they are read, Pod Security "restricted" settings, NetworkPolicies, and, where a model cache is
  mounted, the tier pods mounting it for their replicas to fill (`serve_app.tier.model_fill`).
- nothing in `rayClusterConfig` from a tier's model or engine flags: a model change is a change
  of `serveConfigV2` only, which KubeRay applies to the running cluster; only a pod's shape
  (GPUs, size, placement, image) changes the RayCluster (docs/kubernetes.md).
- each pod's size and placement from the config's `kubernetes` section, or derived from the tier
  (CPU and memory per GPU) and the overlay; a PodDisruptionBudget per worker group and topology
  spread of each group over nodes and zones (docs/kubernetes.md).
What the config does not say about the environment (GPU nodes or not, the model cache's claim)
comes from `Overlay`.
"""

from .disruption import GROUP_LABEL, disruption_budget, group_labels, topology_spread
from .edge import (
    EDGES,
    EdgeLimits,
    edge_limits,
    gateway,
    http_route,
    ingress,
)
from .groups import (
    ROUTER_GROUP,
    ROUTER_RESOURCE,
    autoscaler_options,
    disruption_budgets,
    router_group,
    tier_group,
    tier_resource,
    worker_group,
)
from .images import DEFAULT_VLLM_IMAGE, VLLM_IMAGE_PYTHON, Images
from .overlays import OVERLAYS, Overlay
from .pods import (
    CACHE_ENV,
    DASHBOARD_PORT,
    HEAD_PORTS,
    METRICS_PORT,
    MODEL_CACHE,
    NO_CACHE_ENV,
    OFFLINE_ENV,
    RAY_ENV,
    RAY_POD_LABELS,
    RAY_TMP,
    SERVE_PORT,
    TMP,
    WORKER_PORTS,
    WRITABLE_ENV,
    Role,
    container_resources,
    pod,
)
from .policies import OPERATOR_LABELS, network_policies
from .render import (
    DEFAULT_IMAGE,
    HEADER,
    RAY_VERSION,
    manifests,
    render,
    render_edge_file,
    render_file,
    serve_config_v2,
)
from .security import (
    API_KEYS,
    CONTAINER_SECURITY,
    HF_TOKEN,
    IMAGE_UID,
    POD_SECURITY,
    RAY_TOKEN,
    TOKEN_AUTH_ENV,
    SecretFile,
)
from .sizing import (
    CPU_PER_GPU,
    GPU_TOLERATION,
    MEMORY_GIB_BASE,
    MEMORY_GIB_PER_GPU,
    PodShape,
    cores,
    derived_tier_size,
    head_shape,
    router_shape,
    tier_shape,
)

__all__ = [
    "API_KEYS",
    "CACHE_ENV",
    "CONTAINER_SECURITY",
    "CPU_PER_GPU",
    "DASHBOARD_PORT",
    "DEFAULT_IMAGE",
    "DEFAULT_VLLM_IMAGE",
    "EDGES",
    "GPU_TOLERATION",
    "GROUP_LABEL",
    "HEADER",
    "HEAD_PORTS",
    "HF_TOKEN",
    "IMAGE_UID",
    "MEMORY_GIB_BASE",
    "MEMORY_GIB_PER_GPU",
    "METRICS_PORT",
    "MODEL_CACHE",
    "NO_CACHE_ENV",
    "OFFLINE_ENV",
    "OPERATOR_LABELS",
    "OVERLAYS",
    "POD_SECURITY",
    "RAY_ENV",
    "RAY_POD_LABELS",
    "RAY_TMP",
    "RAY_TOKEN",
    "RAY_VERSION",
    "ROUTER_GROUP",
    "ROUTER_RESOURCE",
    "SERVE_PORT",
    "TMP",
    "TOKEN_AUTH_ENV",
    "VLLM_IMAGE_PYTHON",
    "WORKER_PORTS",
    "WRITABLE_ENV",
    "EdgeLimits",
    "Images",
    "Overlay",
    "PodShape",
    "Role",
    "SecretFile",
    "autoscaler_options",
    "container_resources",
    "cores",
    "derived_tier_size",
    "disruption_budget",
    "disruption_budgets",
    "edge_limits",
    "gateway",
    "group_labels",
    "head_shape",
    "http_route",
    "ingress",
    "manifests",
    "network_policies",
    "pod",
    "render",
    "render_edge_file",
    "render_file",
    "router_group",
    "router_shape",
    "serve_config_v2",
    "tier_group",
    "tier_resource",
    "tier_shape",
    "topology_spread",
    "worker_group",
]

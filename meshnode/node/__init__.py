"""The node: config, model catalogue, deployments, local replicas.

Imports meshnode.mesh and meshnode.engines, never meshnode.http.
"""

from .catalogue import CATALOGUE, DEFAULT_MODEL, ModelSpec, find_spec, locate
from .config import NodeConfig, default_data_dir, load_config
from .deployments import Deployment, LaunchRequest, ScaleRequest
from .errors import (
    ConfigError,
    DeploymentExists,
    InvalidDeployment,
    ModelFailed,
    ModelNotFound,
    ModelUnavailable,
    NodeError,
)
from .node import DeploymentView, Node, NodeState, Target
from .replicas import Replica, ReplicaStatus
from .router import Router, request_key
from .sync import INTERNAL_DEPLOYMENTS_PATH

__all__ = [
    "CATALOGUE",
    "ConfigError",
    "DEFAULT_MODEL",
    "Deployment",
    "DeploymentExists",
    "DeploymentView",
    "INTERNAL_DEPLOYMENTS_PATH",
    "InvalidDeployment",
    "LaunchRequest",
    "ModelFailed",
    "ModelNotFound",
    "ModelSpec",
    "ModelUnavailable",
    "Node",
    "NodeConfig",
    "NodeError",
    "NodeState",
    "Replica",
    "ReplicaStatus",
    "Router",
    "ScaleRequest",
    "Target",
    "default_data_dir",
    "find_spec",
    "load_config",
    "request_key",
    "locate",
]

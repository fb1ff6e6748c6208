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
from .node import DeploymentView, Node, NodeState
from .replicas import Replica, ReplicaStatus

__all__ = [
    "CATALOGUE",
    "ConfigError",
    "DEFAULT_MODEL",
    "Deployment",
    "DeploymentExists",
    "DeploymentView",
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
    "ScaleRequest",
    "default_data_dir",
    "find_spec",
    "load_config",
    "locate",
]

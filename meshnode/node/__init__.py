"""The node: config, model catalogue, deployments, local replicas.

Imports meshnode.mesh and meshnode.engines, never meshnode.http.
"""

from .catalogue import CATALOGUE, DEFAULT_MODEL, ModelSpec, find_spec, is_model_path, locate
from .config import NodeConfig, default_data_dir, load_config
from .deployments import Deployment, LaunchRequest, UpdateRequest
from .errors import (
    ConfigError,
    DeploymentExists,
    InvalidDeployment,
    ModelFailed,
    ModelNotFound,
    ModelUnavailable,
    NodeError,
    ReplicaBusy,
)
from .keys import INTERNAL_KEYS_PATH, ApiKey, CreateKeyRequest, KeyStore, KeyTable, new_key
from .peer_queries import (INTERNAL_ENGINES_PATH, INTERNAL_MODEL_FILE_PATH, engine_rows,
                           local_file_spec, unable)
from .node import DeploymentView, Node, NodeState
from .peers import Target
from .replicas import Replica, ReplicaStatus
from .router import Router, request_key
from .security import INTERNAL_REVOCATION_PATH, ClusterSecurity, is_loopback, load_security
from .sync import INTERNAL_DEPLOYMENTS_PATH, response_ssl_object

__all__ = [
    "CATALOGUE",
    "ConfigError",
    "DEFAULT_MODEL",
    "Deployment",
    "DeploymentExists",
    "DeploymentView",
    "INTERNAL_DEPLOYMENTS_PATH",
    "INTERNAL_REVOCATION_PATH",
    "ClusterSecurity",
    "INTERNAL_ENGINES_PATH",
    "INTERNAL_KEYS_PATH",
    "INTERNAL_MODEL_FILE_PATH",
    "ApiKey",
    "CreateKeyRequest",
    "KeyStore",
    "KeyTable",
    "new_key",
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
    "ReplicaBusy",
    "ReplicaStatus",
    "Router",
    "Target",
    "UpdateRequest",
    "default_data_dir",
    "find_spec",
    "is_loopback",
    "is_model_path",
    "load_config",
    "engine_rows",
    "load_security",
    "local_file_spec",
    "response_ssl_object",
    "request_key",
    "locate",
    "unable",
]

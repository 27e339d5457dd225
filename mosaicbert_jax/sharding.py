"""Device mesh and sharding rules: FSDP by default, optional tensor parallelism.

Parameters and optimizer state are sharded by regular-expression rules on their '/'-joined
parameter paths (TENSOR_RULES): the tensor axis splits the attention/MLP projections those rules
name, the fsdp axis splits the largest remaining divisible dimension. Batches are split over
data x fsdp.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (pattern on the '/'-joined parameter path, dimension split over 'tensor') for 2-D kernels.
TENSOR_RULES: tuple[tuple[str, int], ...] = (
    (r"Wqkv/kernel$", 1),
    (r"gated_layers/kernel$", 1),
    (r"attention_output/dense/kernel$", 0),
    (r"mlp/wo/kernel$", 0),
    (r"word_embeddings/embedding$", 0),
)


def resolve_mesh_shape(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fills in the one axis given as -1 and checks the product equals the device count."""
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    sizes = {name: int(axes.get(name, 1)) for name in MESH_AXES}
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1; got {free}")
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"mesh axis {name}={size} must be positive or -1")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh {sizes}: {num_devices} devices are not divisible by the "
                             f"fixed axes' product {fixed}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices but "
                         f"{num_devices} are present; set one axis to -1 or fix the sizes")
    return sizes


def make_mesh(axes: Mapping[str, int], devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all (or the given) devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape(axes, len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # odd device counts or CPU fakes: plain order is fine there
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def path_name(path: Sequence[Any]) -> str:
    """A tree path as '/'-joined names (dict keys, attributes, indices), as the rules match."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def partition_spec(name: str, shape: Sequence[int], mesh: Mesh) -> P:
    """The PartitionSpec of one parameter (or optimizer moment) by its path and shape."""
    spec: list[Any] = [None] * len(shape)
    tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
    if tensor > 1 and len(shape) == 2:
        for pattern, dim in TENSOR_RULES:
            if re.search(pattern, name) and shape[dim] % tensor == 0:
                spec[dim] = "tensor"
                break
    if fsdp > 1:
        candidates = [d for d in range(len(shape)) if spec[d] is None and shape[d] % fsdp == 0]
        if candidates:
            spec[max(candidates, key=lambda d: shape[d])] = "fsdp"
    return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for every leaf of a params/optimizer-state tree (scalars replicated)."""
    def leaf_sharding(path, leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, partition_spec(path_name(path), shape, mesh))
    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]

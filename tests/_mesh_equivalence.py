"""Run in a subprocess with 8 fake CPU devices: data-parallel, FSDP, mixed and tensor-parallel
(tensor=2) meshes, gradient accumulation, and masked slots shared by groups of rows, give the
1-device train step."""

import os
import sys

from cpu_env import xla_flags

os.environ["XLA_FLAGS"] = xla_flags("--xla_force_host_platform_device_count=8")
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from mosaicbert_jax import MosaicBertConfig, MosaicBertForMaskedLM  # noqa: E402
from mosaicbert_jax.optim import decoupled_adamw, warmup_linear_decay  # noqa: E402
from mosaicbert_jax.sharding import batch_sharding, make_mesh  # noqa: E402
from mosaicbert_jax.data.synthetic import SyntheticMLMBatches  # noqa: E402
from mosaicbert_jax.training.step import init_state, make_train_step  # noqa: E402
from model_cases import group_masked_slots  # noqa: E402


def run(mesh, microbatches, groups=0):
    cfg = MosaicBertConfig.tiny(vocab_size=256, hidden_dropout_prob=0.0)
    model = MosaicBertForMaskedLM(cfg)
    schedule = warmup_linear_decay(1e-3, 10)
    tx = decoupled_adamw(schedule, 1e-3)
    state, shardings = init_state(model, tx, 0, mesh)
    step = make_train_step(model, tx, schedule, mesh, shardings, microbatches)
    batches = SyntheticMLMBatches(16, 32, 256, seed=3, mean_doc_len=12)
    losses, grad_norms = [], []
    for _ in range(2):
        batch = next(batches)
        if groups:  # as many slots a group as its rows had
            batch = group_masked_slots(batch, groups,
                                       16 // groups * batch["masked_positions"].shape[1])
        batch = jax.device_put(batch, batch_sharding(mesh))
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
    return losses, jax.device_get(state["params"]), state, grad_norms


def gated_kernel(result):
    return result[2]["params"]["bert"]["encoder"]["layer_0"]["mlp"]["gated_layers"]["kernel"]


one = run(make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]), 1)
meshes = {"data=8": {"data": 8, "fsdp": 1, "tensor": 1},
          "fsdp=8": {"data": 1, "fsdp": 8, "tensor": 1},
          "data=2 fsdp=4": {"data": 2, "fsdp": 4, "tensor": 1},
          "fsdp=4 tensor=2": {"data": 1, "fsdp": 4, "tensor": 2}}
others = {name: run(make_mesh(axes), 1) for name, axes in meshes.items()}
others["data=2 fsdp=4, 2 microbatches"] = run(make_mesh(meshes["data=2 fsdp=4"]), 2)
# Masked slots shared by groups of two rows: eight groups, one a device.
others["data=2 fsdp=4, grouped slots"] = run(make_mesh(meshes["data=2 fsdp=4"]), 1, groups=8)
assert "fsdp" in str(gated_kernel(others["fsdp=8"]).sharding.spec)
assert "tensor" in str(gated_kernel(others["fsdp=4 tensor=2"]).sharding.spec)
for name, other in others.items():
    np.testing.assert_allclose(one[0], other[0], rtol=1e-5, err_msg=name)
    # Adam's first updates hardly depend on the gradient's scale, so compare it directly: a
    # mesh that summed gradients over devices instead of averaging would be off by 2-8x here.
    np.testing.assert_allclose(one[3], other[3], rtol=1e-4, err_msg=name)
    for a, b in zip(jax.tree_util.tree_leaves(one[1]), jax.tree_util.tree_leaves(other[1])):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4, err_msg=name)
assert abs(one[0][0] - one[0][1]) > 1e-3, one[0]  # the first step changed the parameters
print("OK", one[0], {name: other[0] for name, other in others.items()})
sys.exit(0)

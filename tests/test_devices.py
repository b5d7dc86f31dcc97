"""Several devices: the same diagonals on one and on four (CPU) devices, checked in a
subprocess that asks XLA for four host devices."""

from .helpers import run_on_four_cpu_devices


SCRIPT = r"""
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import curvzoo as cz

devices = jax.devices()
assert len(devices) == 4, devices
one, four = Mesh(np.array(devices[:1]), ("data",)), Mesh(np.array(devices), ("data",))
ce = cz.losses.cross_entropy
calls = {
    "hessian-generic": lambda m, b, **kw: cz.hessian_diagonal(m, ce, b, method="generic", **kw),
    "hessian": lambda m, b, **kw: cz.hessian_diagonal(m, ce, b, method="structured", **kw),
    "per-sample": lambda m, b, **kw: cz.hessian_diagonal(m, ce, b, per_sample=True, **kw),
    "ggn": lambda m, b, **kw: cz.ggn_diagonal(m, ce, b, **kw),
    "empirical-fisher": lambda m, b, **kw: cz.empirical_fisher_diagonal(m, ce, b, **kw),
    "fisher": lambda m, b, **kw: cz.fisher_diagonal(m, ce, b, key=jr.key(1), **kw),
    "hutchinson-cv": lambda m, b, **kw: cz.hutchinson_diagonal(
        m, ce, b, key=jr.key(2), num_probes=4, control_variate="ggn", **kw),
}
# Every kernel once: generic, generic per sample, layered structured (Hessian, GGN,
# gradients), recurrent, vector-Jacobian products (the RNN's GGN and Fisher), Hutchinson.
cases = {
    "mlp": ["hessian-generic", "hessian", "per-sample", "ggn", "fisher", "hutchinson-cv"],
    "gru": ["hessian", "ggn", "empirical-fisher"],
}
models = {
    "mlp": cz.MLP(3, 3, 4, 2, key=jr.key(0)),
    "gru": cz.RNN(2, 3, 3, cell="gru", key=jr.key(0)),
}
shapes = {"mlp": (8, 3), "gru": (8, 4, 2)}
for name, model in models.items():
    x = jr.normal(jr.key(3), shapes[name])
    y = jr.randint(jr.key(4), (8,), 0, 3)
    for call_name in cases[name]:
        call = calls[call_name]
        single = ravel_pytree(call(model, (x, y), mesh=one))[0]
        split = ravel_pytree(call(model, (x, y), mesh=four))[0]
        scale = float(jnp.max(jnp.abs(single)))
        assert scale > 0, (name, call_name)
        message = f"{name} {call_name}"
        np.testing.assert_allclose(split, single, rtol=1e-11, atol=1e-12 * scale, err_msg=message)
# Inputs already sharded are respected (and give the same result).
sharded = jax.device_put(x, NamedSharding(four, PartitionSpec("data")))
assert sharded.sharding.mesh == four
again = ravel_pytree(cz.ggn_diagonal(model, ce, (sharded, y), mesh=four))[0]
np.testing.assert_allclose(again, ravel_pytree(cz.ggn_diagonal(model, ce, (x, y)))[0], rtol=1e-11)
# A non-finite result is named on a mesh too (the flag computed with it, over sharded
# arrays).
mlp, xm = models["mlp"], jr.normal(jr.key(3), shapes["mlp"])
def overflowing(model, batch):
    return jnp.exp(1e4 * jnp.sum(jax.vmap(model)(batch[0]) ** 2))
try:
    cz.hessian_diagonal(mlp, overflowing, (xm,), mesh=four)
except ValueError as error:
    assert "the curvature came out non-finite" in str(error)
else:
    raise AssertionError("no error for a non-finite result on a mesh")
# A batch that four devices cannot split evenly is refused, naming the arguments.
try:
    cz.ggn_diagonal(model, ce, (x[:6], y[:6]), mesh=four)
except ValueError as error:
    assert "`batch` has 6 samples" in str(error) and "`mesh`" in str(error)
else:
    raise AssertionError("no error for an uneven batch")
try:
    cz.ggn_diagonal(model, ce, (x, y), mesh="data")
except TypeError as error:
    assert "`mesh` must be a `jax.sharding.Mesh`" in str(error)
else:
    raise AssertionError("no error for a bad mesh")
print("devices ok")
"""


def test_one_and_four_devices_agree():
    assert "devices ok" in run_on_four_cpu_devices(SCRIPT)

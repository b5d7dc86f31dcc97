"""The benchmark's models and batches, built from curvzoo's public zoo only."""

import equinox as eqx
import jax
import jax.random as jr


RECURRENT = ("gru", "lstm", "elman")
FEED_FORWARD = ("mlp2", "mlp4", "cnn", "small")
BATCH = 128
RECURRENT_BATCH = 32
RECURRENT_INPUT = 8
CLASSES = 10


def build(row: str, seed: int, *, steps: int = 16, hidden: int = 64, batch_size: int | None = None):
    """`(model, (inputs, labels))` for a model row, float32, tanh, 10 classes.

    - `mlp2`: MLP 784-256-256-10, batch 128; `mlp4`: 784-256x4-10, batch 128;
    - `cnn`: the zoo CNN, channels (8, 16), kernel 3, 1x28x28 input, batch 128;
    - `small`: MLP 64-64-64-10, batch 128;
    - `gru`, `lstm`, `elman`: the zoo RNN with that cell, input 8, `hidden` units,
      readout of the last state, `steps` steps, batch 32.

    `batch_size` overrides the batch: the first `batch_size` samples of the same draw
    where it is smaller (a prefix of the full batch), a larger draw where it is larger.
    """
    import curvzoo as cz

    key_model, key_x, key_y = jr.split(jr.key(seed), 3)
    if row in RECURRENT:
        model = cz.RNN(RECURRENT_INPUT, hidden, CLASSES, cell=row, key=key_model)
        sample = (steps, RECURRENT_INPUT)
        full = RECURRENT_BATCH
    else:
        full = BATCH
        if row == "mlp2":
            model = cz.MLP(784, CLASSES, 256, 2, activation=jax.nn.tanh, key=key_model)
            sample = (784,)
        elif row == "mlp4":
            model = cz.MLP(784, CLASSES, 256, 4, activation=jax.nn.tanh, key=key_model)
            sample = (784,)
        elif row == "cnn":
            model = cz.CNN(1, CLASSES, 28, channels=(8, 16), kernel_size=3, key=key_model)
            sample = (1, 28, 28)
        elif row == "small":
            model = cz.MLP(64, CLASSES, 64, 2, activation=jax.nn.tanh, key=key_model)
            sample = (64,)
        else:
            raise ValueError(f"unknown model row {row!r}; models are {FEED_FORWARD + RECURRENT}")
    size = full if batch_size is None else max(full, batch_size)
    inputs = jr.normal(key_x, (size, *sample), dtype="float32")
    labels = jr.randint(key_y, (size,), 0, CLASSES)
    if batch_size is not None:
        inputs, labels = inputs[:batch_size], labels[:batch_size]
    return model, (inputs, labels)


def build_tiny(seed: int):
    """MLP 3-4-2 (tanh) and a batch of 5 labelled samples: a model whose compute is
    negligible, so a call's time is its per-call overhead."""
    import curvzoo as cz

    key_model, key_x, key_y = jr.split(jr.key(seed), 3)
    model = cz.MLP(3, 2, 4, 1, activation=jax.nn.tanh, key=key_model)
    return model, (jr.normal(key_x, (5, 3), dtype="float32"), jr.randint(key_y, (5,), 0, 2))


def build_memory_model(seed: int):
    """MLP 128-256-256-10 (tanh, P = 101386) and a batch of 32: the memory rows'."""
    import curvzoo as cz

    key_model, key_x, key_y = jr.split(jr.key(seed), 3)
    model = cz.MLP(128, CLASSES, 256, 2, activation=jax.nn.tanh, key=key_model)
    inputs = jr.normal(key_x, (32, 128), dtype="float32")
    return model, (inputs, jr.randint(key_y, (32,), 0, CLASSES))


def num_params(model) -> int:
    """Number of trainable (inexact-array) entries: the `P` of the tables."""
    return int(sum(leaf.size for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))))


def fitted_regression(row: str, seed: int, *, steps: int = 50):
    """The row's model after `steps` Adam steps (learning rate 1e-3) of least squares on
    a second, random network's outputs plus noise of standard deviation 0.1.

    **Returns:** `(model, (inputs, targets), final_loss)`.
    """
    import curvzoo as cz

    model, (inputs, _) = build(row, seed)
    teacher, _ = build(row, seed + 1)
    targets = jax.vmap(teacher)(inputs)
    targets = targets + 0.1 * jr.normal(jr.key(seed + 2), targets.shape, dtype=targets.dtype)
    batch = (inputs, targets)
    loss = cz.losses.mse
    model = adam_steps(model, loss, batch, steps)
    return model, batch, float(loss(model, batch))


def adam_steps(model, loss, batch, steps: int):
    """`model` after `steps` full-batch Adam steps (learning rate 1e-3) on
    `loss(model, batch)`."""
    import optax

    optimiser = optax.adam(1e-3)
    state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state):
        grads = eqx.filter_grad(loss)(model, batch)
        updates, state = optimiser.update(grads, state)
        return eqx.apply_updates(model, updates), state

    for _ in range(steps):
        model, state = step(model, state)
    return model

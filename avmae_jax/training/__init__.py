"""Training machinery the training script and the benchmarks share: the generic step
builder (`steps`: train state, sharded init, jitted train step, weight averaging), the
optimizer recipes (`optim`) and the metric writers (`summary`)."""

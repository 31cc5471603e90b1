"""The scaling rules: one module per optimizer family, and the pieces they share.

Each factory validates its hyperparameters and returns a `Transform`. The numerics follow
`torch.optim` op for op, so that the presets built from them (`functrain.optim.presets`) match
torch bit for bit in float32 (`functrain.optim.updates` says how the last rounding is kept exact).

Two kinds of rule:

* scaling rules that leave the learning rate to `learning_rate.scale_by_learning_rate`
  (`adam`, `rms`, `adagrad`, `lion`, `trace`, `adadelta`), and one that needs no learning rate
  after the first step (`rprop`);
* final steps, which take the learning rate themselves because torch's last ops mix it with
  per-step or per-tensor scalars in ways one `ParamStep` cannot say (`adam.nadam_step`: two
  ``addcdiv``; `asgd.asgd_step`: a rate kept in the state; `muon.scale_by_adjusted_learning_rate`:
  a rate per matrix shape). They
  emit `NewParams`, computed with torch's own final ops; their state exposes the metric ``lr``.

Shared pieces: `learning_rate`, `weight_decay`, `clipping`, `arithmetic` (scalars rounded as
torch rounds them) and `fused` (torch's fused SGD, Adam and Adagrad kernels).
"""

"""The device check a user runs first on a new node: ``python -m resgarden.check [--json FILE]``,
also under ``mpirun`` / ``msrun`` / ``srun`` on every rank. It checks what a data-parallel training
job relies on, on whatever device this installation targets, and writes a short report:

- MindSpore's own ``run_check()``;
- each seed model's forward pass and one training step at float32 and at each of its recipes' AMP
  levels on this device, against the same model, weights and batch in float32 on CPU
  (:mod:`.numerics`);
- an overflow injected into one rank's gradients: every rank skips that step and moves its loss
  scale alike; 8 steps with and without dataset sink mode; all ranks holding the same weights after
  3 data-parallel steps (:mod:`.training`);
- the input pipeline's img/s per rank against the model's training img/s (:mod:`.throughput`).
"""

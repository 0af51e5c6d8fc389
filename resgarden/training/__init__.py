"""Training: the train step (loss scale, clipping, accumulation, EMA; ``train_step``), AMP
(``amp``), optimizers and schedules (``optim``), the step loop (``steps``), the trainer that ties
them to data, checkpoints and preemption (``trainer``) and its plots (``plot``)."""

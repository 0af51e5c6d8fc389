"""Where a job runs: the cluster (launchers, ranks, collectives; ``distributed``) and MindSpore's
context for a resolved device target (``context``)."""

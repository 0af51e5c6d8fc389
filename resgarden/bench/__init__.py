"""The measurement side of ``benchmark.py``: one framework's model timed in its own process
(``worker``) and the input pipeline's throughput (``pipeline``)."""

"""The engine shared by train.py, validate.py, eval.py and benchmark.py."""

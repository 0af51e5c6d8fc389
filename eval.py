"""mindspore/models-style evaluation, same engine as validate.py:

    python eval.py --data_path=/path/to/imagenet/val --device_target=CPU --checkpoint_file_path=<run>/ckpt_0/
"""
from __future__ import annotations

import sys

from validate import main

if __name__ == "__main__":
    sys.exit(main(prog="eval.py"))

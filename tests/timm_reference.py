"""Run under a Python that has torch + timm: write a timm model with random weights (and random
BN statistics) as .safetensors, plus its logits for a fixed input, for tests/test_convert.py.

    python tests/timm_reference.py <timm name> <out dir>
"""
import os
import sys

import numpy as np
import timm
import torch
from safetensors.torch import save_file

name, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = timm.create_model(name, pretrained=False)
generator = np.random.RandomState(1)
with torch.no_grad():
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            size = module.num_features
            module.weight.copy_(torch.from_numpy(generator.uniform(0.5, 1.5, size).astype(np.float32)))
            module.bias.copy_(torch.from_numpy(generator.uniform(-0.2, 0.2, size).astype(np.float32)))
            module.running_mean.copy_(torch.from_numpy(generator.uniform(-0.2, 0.2, size).astype(np.float32)))
            module.running_var.copy_(torch.from_numpy(generator.uniform(0.5, 1.5, size).astype(np.float32)))
model.eval()
images = np.random.RandomState(2).randn(2, 3, 96, 96).astype(np.float32)
with torch.no_grad():
    logits = model(torch.from_numpy(images)).numpy()
os.makedirs(out, exist_ok=True)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, "weights.safetensors"))
np.save(os.path.join(out, "images.npy"), images)
np.save(os.path.join(out, "logits.npy"), logits)

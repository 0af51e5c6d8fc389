"""Run under a Python that has torch + timm: for each timm name, write the model with random
weights (and random BN statistics) as .safetensors, its logits for a fixed input and the feature
maps of its ``features_only`` form with the same weights, for tests/test_timm_parity.py.

    python tests/timm_reference.py <out dir> <timm name> [<timm name> ...]
    python tests/timm_reference.py <out dir> --serve     (one name per input line, answers its folder)

writes <out dir>/<timm name>/{weights.safetensors, images.npy, logits.npy, features.npz}. A name
``<timm name>@<n>`` builds the model with ``output_stride=n``. Serving
keeps one torch process for many models while the caller removes each folder after use (the
largest weights are a few hundred MB).
"""
import os
import sys

import numpy as np
import timm
import torch
from safetensors.torch import save_file


def reference(spec: str, out: str) -> str:
    name, _, stride = spec.partition("@")
    options = dict(output_stride=int(stride)) if stride else {}
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **options)
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
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    features = timm.create_model(name, pretrained=False, features_only=True, **options)
    features.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
    features.eval()
    images = np.random.RandomState(2).randn(2, 3, 96, 96).astype(np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(images)).numpy()
        maps = [m.numpy() for m in features(torch.from_numpy(images))]
    folder = os.path.join(out, spec)
    os.makedirs(folder, exist_ok=True)
    save_file(state, os.path.join(folder, "weights.safetensors"))
    np.save(os.path.join(folder, "images.npy"), images)
    np.save(os.path.join(folder, "logits.npy"), logits)
    np.savez(os.path.join(folder, "features.npz"), *maps)
    return folder


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if sys.argv[2:] == ["--serve"]:
        for line in sys.stdin:
            print(reference(line.strip(), sys.argv[1]), flush=True)
    else:
        for timm_name in sys.argv[2:]:
            reference(timm_name, sys.argv[1])

"""Images in, batches out: the splits (class folders, list files, CIFAR-10, the embedded digits;
``datasets``), decoding (``images``), the train and eval transforms (``augment``), the data
workers that make the batches (``batches``) and ImageNet-ReaL labels (``real_labels``)."""

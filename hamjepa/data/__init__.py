"""Data: sources (readers, locating, downloading; cifar: the safe CIFAR unpickler), splits, feeds that put two
augmented views on the device, and the augmentation itself."""

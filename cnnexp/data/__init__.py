"""Data stage: locate a dataset offline, decode it once (cached by content), subset, scale, split.

Modules: `load` (the entry point: `load_dataset`), `raw` (decoded arrays, their checks, seeded
subsets), `formats` (CIFAR-10 batches, mnist.npz, idx), `folders` and `archives` (image-folder
trees, read in memory), `cache` (the verified decode cache).
"""

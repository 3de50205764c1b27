"""Throughput benchmarks: `pretrain bench data` (our data path against webdataset + the transformers image
processor, per worker) and `pretrain bench train` (our Trainer against transformers' Trainer + DeepSpeed on the same
model, data and global batch). Inputs are generated locally (photo-like JPEG shards, a local tokenizer), so no
benchmark downloads anything."""

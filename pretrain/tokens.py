"""Token constants shared by the data, the model, the trainer and the export: a leaf (imports nothing of ours), so
every layer can name them without importing another layer."""

# Label of a position that has no loss (prompt, image tokens, padding): PyTorch cross-entropy's ignore_index.
IGNORE = -100
# The image placeholder: in conversations, and as the token the model's image features replace.
IMAGE_TOKEN = "<image>"
# Added to a tokenizer that has no pad token.
PAD_TOKEN = "<pad>"
# The clip placeholder (LLaVA-Video's `<video>`), and the token its frames' features replace (video runs only).
VIDEO_TOKEN = "<video>"

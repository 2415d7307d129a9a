"""Stage 1 of the pipeline — checkpoints: resolving models (local or Hub), reading safetensors
tensors and shards, layer groups, output heads, chat templates, compatibility checks."""

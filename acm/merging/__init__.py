"""Stage 4 — merging: the method registry, the per-tensor kernels, the streaming engine, the
merged model's record (recipe, model card, mergekit export) and the staged rule merges."""

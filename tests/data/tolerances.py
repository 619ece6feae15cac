"""Every expected figure and floor the data tests check, in one table (see fewer/data/README.md)."""

TOLERANCES = {
    # prepared folder, wheel cache included, must stay small enough to carry to the GPU machine
    "max_prepared_mib": 15.0,
    # Shakespeare: 38 plays, 3 held out; byte-level BPE with 4096 entries must actually compress
    "num_plays": 38,
    "num_val_plays": 3,
    "vocab_size": 4096,
    "min_chars_per_token": 2.5,      # measured 3.1 on the training plays
    "val_token_fraction": (0.03, 0.12),  # measured 0.067
    "min_train_tokens": 1_000_000,   # measured 1,485,431
    # english corpus (fewer data prepare --corpus english), checked only when prepared
    "english_min_tokens": 20_000_000,       # the floor
    "english_val_fraction": (0.015, 0.08),  # per source; target 3% of characters, whole documents
    "english_max_mib": 40.0,                # tokens + tokenizer + summary, to carry with the repository
    # images
    "digits_split": (1500, 297),
    "mnist_split": (4500, 500),
    "mnist_mean_ink": (0.12, 0.14),  # mean pixel in [0, 1]; MNIST's published mean is 0.1307
    "image_exact_atol": 1e-6,        # pooled/padded images against an fp64 recomputation
}

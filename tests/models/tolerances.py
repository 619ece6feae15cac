"""Every tolerance and quality floor used by tests/models, in one place."""

TOLERANCES = {
    # float32 forward of the same weights along two code paths (cache vs none, GQA vs repeated KV, backends)
    "fp32_same_math_atol": 1e-5,
    # RoPE relative-position identity, float64 inputs
    "rope_relative_atol": 1e-10,
    # TrigFlow identities (x0, z recovered from x_t and v), float64
    "trigflow_identity_atol": 1e-12,
    # samples in a batch vs alone (batched matmuls may round differently)
    "batch_invariance_atol": 1e-5,
    # CFG at scale s vs uncond + s * (cond - uncond) computed separately
    "cfg_atol": 1e-5,
    # loss after a few steps on a fixed batch must drop below this fraction of its start value
    "train_loss_ratio": 0.8,
    # DigitClassifier test accuracy on sklearn digits (1500 train / 297 test)
    "digits_classifier_accuracy": 0.97,
}

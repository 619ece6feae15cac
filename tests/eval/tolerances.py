"""Every tolerance used by tests/eval, in one place."""

TOLERANCES = {
    # Frechet distance of a set with itself (float64 round-off of a sqrt of a product)
    "fd_self_abs": 1e-6,
    # Frechet distance vs its closed form for Gaussians with known parameters (relative)
    "fd_closed_form_rel": 1e-8,
    # scipy and eigh square-root paths agree (relative)
    "fd_methods_rel": 1e-6,
    # SSIM against the brute-force per-window oracle
    "ssim_oracle_atol": 1e-12,
}

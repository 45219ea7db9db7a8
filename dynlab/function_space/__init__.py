"""dynlab.function_space: what the network *does* at a checkpoint, as pure functions of a
model, a loss and a fixed batch (no file I/O; the per-checkpoint driver and the store writes
are in `dynlab.analysis.dynamics`).

    curvature   Hessian-vector products, Lanczos top-k eigenvalues, Hutchinson's trace,
                Adam's preconditioner and the adaptive edge-of-stability threshold
    landscape   the loss along the straight line between two parameter vectors, the barrier
    noise       the gradient noise scale B_simple from per-micro-batch gradients
    attention   attention entropy, attention-sink score, massive activations
    updates     the update-to-weight ratio ‖ΔW‖_F / ‖W‖_F
"""

"""Function-preserving weight rewrites, named after where they act: Hadamard rotations (QuaRot), AWQ smoothing."""

"""State-dict mapping between ldmlab, SD-original and diffusers layouts."""

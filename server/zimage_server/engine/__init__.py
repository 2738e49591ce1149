"""The Z-Image engine: diffusers components driven by our own batched denoising loop."""

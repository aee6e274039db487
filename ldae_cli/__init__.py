"""ldae: latent denoising autoencoders (l-DAE) from PCA to COCO detection."""

__version__ = "0.1.0"

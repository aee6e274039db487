"""ldae: latent denoising autoencoders (l-DAE) from PCA to COCO detection.

Also a library, `import ldae_cli as ldae`: ldae.load_encoder, ldae.load_pretrained, ldae.extract_features,
ldae.denoise, ldae.info and ldae.collect_images (ldae_cli/api.py). They are imported on first use, so that
`import ldae_cli` (and with it `ldae --help`) does not import torch.
"""

__version__ = "0.1.0"

_API = ("load_encoder", "load_pretrained", "extract_features", "denoise", "info", "collect_images")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from ldae_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'ldae_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})

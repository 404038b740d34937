"""pn_jax: Propose Noising (PatchCore + feature influence + adaptive noise) in JAX/Flax.

    import pn_jax
    model = pn_jax.fit(cfg, "good_images/")        # a folder, paths, an array or a data source
    pred = model.predict("new_images/")             # scores, normalised scores, labels, maps
    model.save("ckpt"); model = pn_jax.load("ckpt")

Names load lazily, so `pn_jax.export.load_exported` runs an exported model with jax and
numpy alone (no flax, orbax or detector code is imported).
"""
__version__ = "0.1.0"

_LAZY = {"Config": "pn_jax.config", "tiny_config": "pn_jax.config", "Model": "pn_jax.model",
         "Prediction": "pn_jax.model", "choose_threshold": "pn_jax.fitting", "fit": "pn_jax.fitting",
         "load": "pn_jax.model", "load_exported": "pn_jax.export"}
__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pn_jax' has no attribute {name!r}")

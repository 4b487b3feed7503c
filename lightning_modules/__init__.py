"""LightningModules: each holds one method (training a classifier, compressing a layer, ...)."""

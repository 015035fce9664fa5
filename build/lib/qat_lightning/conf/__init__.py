"""Hydra configs, shipped inside the package so a wheel install runs (`pkg://qat_lightning.conf`)."""

"""bat_jax.train"""

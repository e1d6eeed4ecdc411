"""bat_jax.models"""

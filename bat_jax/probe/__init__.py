"""bat_jax.probe"""

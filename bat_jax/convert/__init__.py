"""bat_jax.convert"""

"""bfloat16 compute (the probe config's default encoder dtype, the reference's autocast): operands in bf16,
products accumulated in float32 and rounded to bf16 once, as autocast's matmuls do. Besides the precision,
this is what lets XLA:CPU run the dots in YNNPACK's bf16 kernels (`bat_jax.models.xla_options`)."""

import jax
import jax.numpy as jnp
import numpy as np

from bat_jax.models.layers import Linear, attention

BF16_EPS = 2.0**-8  # bfloat16's machine epsilon (8 significand bits): unit roundoff 2⁻⁹


def test_linear_adds_the_bias_in_float32_and_rounds_once():
    # x·W = 256 + 1 = 257 lies halfway between the bf16 neighbours 256 and 258: rounded before the bias it
    # would become 256 (ties to even) and 256 − 1 = 255; the float32 sum 257 − 1 = 256 is exact in bf16.
    layer = Linear((2,), (1,), ("embed", "mlp"), dtype=jnp.bfloat16)
    params = {"kernel": jnp.ones((2, 1)), "bias": jnp.full((1,), -1.0)}
    y = layer.apply({"params": params}, jnp.array([[256.0, 1.0]]))
    assert y.dtype == jnp.bfloat16
    assert float(y[0, 0]) == 256.0


def test_bfloat16_attention_is_float32_attention_within_bf16_rounding():
    """Scores of magnitude ~20 (where bf16's spacing is 1/8): rounding the scores before the softmax would
    move the probabilities by up to e^(1/16) − 1 ≈ 6 %. With float32 scores only the unnormalised
    probabilities, 1 / their sum and the output are rounded, each by ≤ 2⁻⁹ relative (the inputs are exact
    in bf16 here): ≤ 2·2⁻⁹·max|v| from the probabilities, ≤ 2·2⁻⁹·|out| ≤ 2⁻⁸·max|v| from the other two,
    so |out − out_f32| ≤ 2⁻⁷ · max|v|."""
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    shape = (2, 40, 3, 16)  # [B, N, H, Dh]
    q = (jax.random.normal(kq, shape) * 5.0).astype(jnp.bfloat16)
    k = (jax.random.normal(kk, shape) * 5.0).astype(jnp.bfloat16)
    v = jax.random.normal(kv, shape).astype(jnp.bfloat16)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) / 4.0
    assert float(jnp.percentile(jnp.abs(s), 90)) > 16  # the regime the test is about
    ours = attention(q, k, v)
    assert ours.dtype == jnp.bfloat16
    want = attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    err = np.abs(np.asarray(ours, np.float32) - np.asarray(want))
    assert err.max() <= 2 * BF16_EPS * float(jnp.abs(v.astype(jnp.float32)).max())

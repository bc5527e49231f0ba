"""The hook-point vocabulary reads and patches what it says it does."""

import pytest
import torch

from steering import hooks
from steering import vectors as sv
from steering.tiny import tiny_model


def ids(seed=3):
    return torch.randint(4, 100, (2, 7), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_resid_points_match_hidden_states(arch):
    model = sv.attach_steering(tiny_model(arch))
    sv.set_vectors(model, {l: torch.randn(32) for l in range(3)})
    x = ids()
    with torch.no_grad():
        out, cache = hooks.run_with_cache(model, x, names=lambda n: "resid" in n or n == "hook_logits",
                                          output_hidden_states=True)
    hs = out.hidden_states
    for l in range(3):
        assert torch.equal(cache[f"blocks.{l}.hook_resid_pre"], hs[l])
        if l < 2:
            assert torch.equal(cache[f"blocks.{l}.hook_resid_post"], hs[l + 1])
    assert torch.equal(cache["hook_logits"], out.logits)
    # logit lens on the last residual reproduces the model's logits exactly
    assert torch.equal(hooks.unembed(model, cache["blocks.2.hook_resid_post"]), out.logits)


def test_decomposition_resid_post_equals_pre_plus_attn_plus_mlp():
    model = tiny_model("qwen2")
    with torch.no_grad():
        _, c = hooks.run_with_cache(model, ids(), names=lambda n: n.startswith("blocks.1."))
    total = c["blocks.1.hook_resid_pre"] + c["blocks.1.hook_attn_out"] + c["blocks.1.hook_mlp_out"]
    torch.testing.assert_close(total, c["blocks.1.hook_resid_post"], rtol=0, atol=1e-6)


def test_add_at_resid_post_equals_steering_vector():
    x = ids()
    s = torch.randn(32)
    with torch.no_grad():
        hooked = hooks.run_with_hooks(tiny_model("llama"), x,
                                      fwd_hooks=[("blocks.0.hook_mlp_out", hooks.add_at(s))]).logits
        steered = sv.attach_steering(tiny_model("llama"), layers=[0], init={0: s})(x).logits
    assert torch.equal(hooked, steered)


def test_patching_all_heads_equals_replacing_the_whole_activation():
    model = tiny_model("qwen2")
    x, x2 = ids(1), ids(2)
    n_heads, n_kv, d_head = hooks.attention_shape(model)
    with torch.no_grad():
        _, clean = hooks.run_with_cache(model, x2, names=["blocks.1.attn.hook_v"])
        v = clean["blocks.1.attn.hook_v"]
        a = hooks.run_with_hooks(model, x,
                                 fwd_hooks=[("blocks.1.attn.hook_v", hooks.patch_heads(v, range(n_kv), d_head))])
        b = hooks.run_with_hooks(model, x, fwd_hooks=[("blocks.1.attn.hook_v", hooks.replace_with(v))])
        c = hooks.run_with_hooks(model, x, fwd_hooks=[("blocks.1.attn.hook_v", hooks.patch_heads(v, [0], d_head))])
        base = model(x)
    assert torch.equal(a.logits, b.logits)
    assert not torch.equal(c.logits, b.logits) and not torch.equal(c.logits, base.logits)


def test_unknown_hook_point_errors():
    with pytest.raises(ValueError, match="unknown hook point"):
        hooks.resolve(tiny_model("qwen2"), "blocks.0.hook_nope")
    with pytest.raises(ValueError, match="out of range"):
        hooks.resolve(tiny_model("qwen2"), "blocks.9.hook_resid_post")

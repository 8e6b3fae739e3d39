"""Dream, MMaDA, DiffuLLaMA and LLaDA-MoE ports (issue 9).

- parity with the original PyTorch outputs in tests/fixtures/<family>/golden.npz (fp32, 1e-4):
  logits, every hidden state and block output, the padded variants (all rows), MoE router logits
  and top-k experts;
- the released configurations (ports.presets) pass the whitelists and have the published
  parameter counts, computed with jax.eval_shape;
- mask token ids: family defaults and the order in which load_pretrained resolves them;
- broken checkpoints of each family fail with a CheckpointError / ConfigError naming the problem.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import ports
from ports import CheckpointError, ConfigError, presets
from ports.families import FAMILIES, default_mask_token_id
from ports.transformer import default_positions

from conftest import activations

FIXTURES = Path(__file__).parent / "fixtures"
TOL = dict(atol=1e-4, rtol=1e-4)
PORTED = ("dream", "mmada", "diffullama", "llada_moe")

# What each fixture's PROVENANCE.md documents about its reference implementation.
CONVENTIONS = {
    "dream": dict(logit_shift=1, padding="query_key_zero", position_ids="left_pad_shift"),
    "mmada": dict(logit_shift=0, padding="query_key_uniform", position_ids="absolute"),
    "diffullama": dict(logit_shift=1, padding="key", position_ids="absolute"),
    "llada_moe": dict(logit_shift=0, padding="key", position_ids="absolute"),
}


@jax.jit
def _forward(backbone, ids):
    modules = ("embed", "attn", "mlp", "resid", "final") + (("router",) if backbone.config.is_moe else ())
    return activations(backbone, ids, modules=modules)


@functools.lru_cache(maxsize=None)
def _load_case(family: str) -> SimpleNamespace:
    """Load one fixture and run its forwards once; shared by every test of the module."""
    directory = FIXTURES / family
    golden = dict(np.load(directory / "golden.npz"))
    backbone = ports.load_pretrained(directory)
    logits, inter = _forward(backbone, jnp.asarray(golden["input_ids"], jnp.int32))
    padded = None
    if "logits_padded" in golden:
        padded = backbone.logits(golden["input_ids_padded"], golden["attention_mask_padded"])
    return SimpleNamespace(family=family, golden=golden, backbone=backbone, logits=np.asarray(logits),
                           inter=jax.tree.map(np.asarray, inter), padded=padded)


@pytest.fixture(scope="module", params=PORTED)
def case(request):
    return _load_case(request.param)


# --- parity --------------------------------------------------------------------------------------

def test_config_follows_the_reference_conventions(case):
    c = case.backbone.config
    assert c.family == case.family
    assert {k: getattr(c, k) for k in CONVENTIONS[case.family]} == CONVENTIONS[case.family]
    assert case.golden["logits"].shape == (2, 16, c.vocab_size)


def test_mask_token_id_is_the_one_the_reference_used(case):
    expected = int(case.golden["mask_token_id"])
    if case.family == "diffullama":
        # config.json has none and the family default (811) lies outside the fixture's 384 ids
        assert case.backbone.mask_token_id is None
        forced = ports.load_pretrained(FIXTURES / "diffullama", mask_token_id=expected)
        assert forced.mask_token_id == expected
    else:
        assert case.backbone.mask_token_id == expected


def test_logits_match_reference(case):
    np.testing.assert_allclose(case.logits, case.golden["logits"], **TOL)


def test_every_hidden_state_and_block_output_matches_reference(case):
    g, inter, n_layers = case.golden, case.inter, case.backbone.config.n_layers
    assert g["hidden_states"].shape[0] == n_layers + 1 and g["block_outputs"].shape[0] == n_layers
    np.testing.assert_allclose(inter["embed"], g["hidden_states"][0], **TOL)
    for i in range(1, n_layers):
        np.testing.assert_allclose(inter["resid"][i - 1], g["hidden_states"][i], **TOL)
    np.testing.assert_allclose(inter["final"], g["hidden_states"][n_layers], **TOL)
    for i in range(n_layers):
        np.testing.assert_allclose(inter["resid"][i], g["block_outputs"][i], **TOL)
    # the block output is the residual stream plus the two sub-layer outputs
    before = np.concatenate([inter["embed"][None], inter["resid"][:-1]])
    np.testing.assert_allclose(before + inter["attn"] + inter["mlp"], inter["resid"], atol=1e-5)


# DiffuLLaMA's reference inference never pads (it always passes the all-zero 4-D mask), so its
# fixture has no padded golden.
PADDED = ("dream", "mmada", "llada_moe")


@pytest.mark.parametrize("family", PADDED)
def test_padded_batch_matches_reference_on_every_row(family):
    case = _load_case(family)
    np.testing.assert_allclose(case.padded, case.golden["logits_padded"], **TOL)


def test_dream_positions_follow_its_sampler():
    g = _load_case("dream").golden
    mask = jnp.asarray(g["attention_mask_padded"])
    positions = default_positions(mask, *mask.shape, "left_pad_shift")
    np.testing.assert_array_equal(positions, g["position_ids_padded"])


@pytest.mark.parametrize("family", PADDED)
def test_pad_token_ids_do_not_reach_real_tokens(family):
    case = _load_case(family)
    ids, mask = case.golden["input_ids_padded"].copy(), case.golden["attention_mask_padded"]
    ids[mask == 0] = 5
    other = case.backbone.logits(ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(other)[real], np.asarray(case.padded)[real], atol=1e-5)


def test_all_ones_mask_equals_no_mask(case):
    ids = case.golden["input_ids"]
    np.testing.assert_allclose(case.backbone.logits(ids, np.ones_like(ids)), case.logits, atol=1e-5)


def test_moe_router_logits_and_topk_experts_match_reference():
    moe = _load_case("llada_moe")
    c, g = moe.backbone.config, moe.golden
    router = moe.inter["router"]  # [L, B, T, E]
    assert router.shape == (c.n_layers, 2, 16, c.num_experts)
    flat = router.reshape(c.n_layers, -1, c.num_experts)  # batch-major, as the golden array
    np.testing.assert_allclose(flat, g["router_logits"], **TOL)
    probs = jax.nn.softmax(jnp.asarray(flat), axis=-1)
    _, top = jax.lax.top_k(probs, c.experts_per_token)
    np.testing.assert_array_equal(np.asarray(top), g["router_topk_experts"])


# --- released configurations ---------------------------------------------------------------------

def analytic_param_count(c: ports.TransformerConfig) -> int:
    """Parameters of a pre-norm SwiGLU transformer, counted by hand from the config."""
    D, H, F, V = c.d_model, c.head_dim, c.mlp_hidden, c.vocab_size
    attn = D * H * (2 * c.n_heads + 2 * c.n_kv_heads)
    attn += H * (c.n_heads + 2 * c.n_kv_heads) if c.qkv_bias else 0
    attn += 2 * H if c.qk_norm else 0
    mlp = 3 * D * F * c.num_experts + D * c.num_experts if c.is_moe else 3 * D * F
    per_layer = attn + mlp + 2 * D
    return V * D + c.n_layers * per_layer + D + (0 if c.tie_embeddings else D * V)


@pytest.mark.parametrize("name", list(presets.RELEASED))
def test_released_config_passes_its_family_whitelist(name):
    raw = presets.released_raw(name)
    assert ports.detect_family(raw).name == presets.FAMILY[name]
    config = presets.released_config(name)
    assert config.family == presets.FAMILY[name]
    assert config.logit_shift == CONVENTIONS.get(config.family, dict(logit_shift=0))["logit_shift"]


# (low, high) in parameters: the published sizes.
RELEASED_SIZES = {
    presets.LLADA_8B_BASE: (7.95e9, 8.05e9),       # "8B"
    presets.DREAM_7B_BASE: (7.61e9, 7.62e9),       # hub page: 7.62B params
    presets.MMADA_8B_BASE: (8.0e9, 8.1e9),         # LLaDA-8B + 8192 image codes in and out
    presets.DIFFULLAMA_7B: (6.73e9, 6.74e9),       # Llama-2-7B: 6.74B
    presets.LLADA_MOE_7B_A1B: (7.0e9, 7.5e9),      # "7B total"
}


@pytest.mark.parametrize("name", list(presets.RELEASED))
def test_released_parameter_count_by_eval_shape(name):
    config = presets.released_config(name)
    abstract = ports.abstract_params(config)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))  # nothing allocated
    n = ports.count_params(config)
    low, high = RELEASED_SIZES[name]
    assert low <= n <= high, f"{name}: {n:,}"
    assert n == analytic_param_count(config)


def test_llada_moe_active_parameters_match_the_model_card():
    """7B total, 1.4B activated: the top-8 of 64 experts plus everything else except the input
    embedding (a lookup, not a matmul)."""
    c = presets.released_config(presets.LLADA_MOE_7B_A1B)
    total = ports.count_params(c)
    experts = 3 * c.d_model * c.mlp_hidden * c.num_experts * c.n_layers
    active = total - experts * (c.num_experts - c.experts_per_token) // c.num_experts
    assert 1.35e9 <= active - c.vocab_size * c.d_model <= 1.45e9
    # bf16 shards on the hub: 5 GB + 5 GB + 4.72 GB
    assert abs(2 * total - 14.72e9) / 14.72e9 < 0.005


def test_mmada_whitelist_accepts_the_fields_its_training_scripts_save():
    raw = presets.released_raw(presets.MMADA_8B_BASE) | presets.MMADA_TRAINING_FIELDS
    assert ports.parse_config(raw) == presets.released_config(presets.MMADA_8B_BASE)
    with pytest.raises(ConfigError, match="w_clip_vit=True"):
        ports.parse_config(raw | {"w_clip_vit": True})


def test_dream_whitelist_accepts_use_mrope_false_only():
    raw = presets.released_raw(presets.DREAM_7B_BASE)
    assert ports.parse_config(raw | {"use_mrope": False}) == presets.released_config(presets.DREAM_7B_BASE)
    with pytest.raises(ConfigError, match="use_mrope=True"):
        ports.parse_config(raw | {"use_mrope": True})


# --- mask token ids -------------------------------------------------------------------------------

RELEASED_MASK_IDS = {"llada": 126336, "mmada": 126336, "dream": 151666, "diffullama": 811,
                     "llada_moe": 156895}


def test_every_family_knows_its_released_mask_id():
    assert {name: f.default_mask_token_id for name, f in FAMILIES.items()} == RELEASED_MASK_IDS


@pytest.mark.parametrize("name", list(presets.RELEASED))
def test_released_configs_agree_with_the_family_default(name):
    config = presets.released_config(name)
    default = default_mask_token_id(config)
    assert default == RELEASED_MASK_IDS[config.family]
    if config.mask_token_id is not None:  # LLaDA, MMaDA and Dream write it into config.json
        assert config.mask_token_id == default


def test_default_is_not_guessed_for_a_vocabulary_that_cannot_hold_it():
    config = presets.released_config(presets.DIFFULLAMA_7B)
    assert default_mask_token_id(config.replace(vocab_size=811)) is None
    assert default_mask_token_id(config.replace(vocab_size=812)) == 811


def _diffullama_with_vocab(dst: Path, vocab: int) -> Path:
    """The DiffuLLaMA fixture grown to `vocab` ids (new rows zero), no tokenizer files."""
    tensors = load_file(FIXTURES / "diffullama" / "model.safetensors")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        grown = np.zeros((vocab, tensors[key].shape[1]), np.float32)
        grown[: tensors[key].shape[0]] = tensors[key]
        tensors[key] = grown
    config = json.loads((FIXTURES / "diffullama" / "config.json").read_text()) | {"vocab_size": vocab}
    return write_checkpoint(dst, tensors, config)


def test_load_pretrained_falls_back_to_the_family_default(tmp_path):
    assert ports.load_pretrained(_diffullama_with_vocab(tmp_path, 1024)).mask_token_id == 811


def test_config_tokenizer_and_argument_take_precedence_over_the_default(tmp_path):
    directory = _diffullama_with_vocab(tmp_path, 1024)
    (directory / "tokenizer_config.json").write_text(json.dumps({"mask_token": "<|mask|>"}))
    (directory / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": 1000, "content": "<|mask|>"}]}))
    assert ports.load_pretrained(directory).mask_token_id == 1000
    config = json.loads((directory / "config.json").read_text()) | {"mask_token_id": 900}
    (directory / "config.json").write_text(json.dumps(config))
    assert ports.load_pretrained(directory).mask_token_id == 900
    assert ports.load_pretrained(directory, mask_token_id=5).mask_token_id == 5


# --- broken checkpoints: one clear error each, for every family -----------------------------------

def write_checkpoint(dst: Path, tensors: dict, config: dict) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(config))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def broken_copy(dst: Path, family: str, drop=(), add=None, config_changes=None) -> Path:
    tensors = load_file(FIXTURES / family / "model.safetensors")
    for key in drop:
        del tensors[key]
    tensors.update(add or {})
    config = json.loads((FIXTURES / family / "config.json").read_text()) | (config_changes or {})
    return write_checkpoint(dst, tensors, config)


A_LAYER_TENSOR = {
    "dream": "model.layers.2.self_attn.k_proj.bias",
    "mmada": "model.transformer.blocks.1.ff_out.weight",
    "diffullama": "model.layers.0.mlp.up_proj.weight",
    "llada_moe": "model.layers.1.mlp.experts.3.up_proj.weight",  # one expert of one MoE layer
}


@pytest.mark.parametrize("family", PORTED)
def test_missing_tensor(tmp_path, family):
    key = A_LAYER_TENSOR[family]
    with pytest.raises(CheckpointError, match=rf"lacks 1 tensor\(s\) the config requires: {key}$"):
        ports.load_pretrained(broken_copy(tmp_path, family, drop=[key]))


def test_moe_checkpoint_missing_a_whole_expert(tmp_path):
    keys = [f"model.layers.0.mlp.experts.7.{p}_proj.weight" for p in ("gate", "up", "down")]
    with pytest.raises(CheckpointError, match=r"lacks 3 tensor\(s\).*experts\.7\.down_proj"):
        ports.load_pretrained(broken_copy(tmp_path, "llada_moe", drop=keys))


@pytest.mark.parametrize("family", PORTED)
def test_extra_tensor(tmp_path, family):
    key = {"mmada": "model.transformer.blocks.0.attn_norm.bias"}.get(
        family, "model.layers.0.self_attn.rotary_emb.inv_freq")
    with pytest.raises(CheckpointError,
                       match=rf"1 tensor\(s\) the {family} architecture does not use: {key}"):
        ports.load_pretrained(broken_copy(tmp_path, family, add={key: np.ones(8, np.float32)}))


def test_moe_config_with_fewer_experts_than_the_checkpoint(tmp_path):
    # the router is the first tensor whose shape gives the mismatch away
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.gate\.weight .* shape \[8, 64\].*"
                                              r"expected \[64, 6\]"):
        ports.load_pretrained(broken_copy(tmp_path, "llada_moe", config_changes={"num_experts": 6}))


KV_HEADS_FIELD = {"dream": ("num_key_value_heads", 4), "mmada": ("n_kv_heads", 2),
                  "diffullama": ("num_key_value_heads", 2), "llada_moe": ("num_key_value_heads", 2)}


@pytest.mark.parametrize("family", PORTED)
def test_kv_heads_in_config_do_not_match_the_tensors(tmp_path, family):
    field, wrong = KV_HEADS_FIELD[family]
    directory = broken_copy(tmp_path, family, config_changes={field: wrong})
    with pytest.raises(CheckpointError, match=rf"n_kv_heads={wrong} heads of head_dim 16"):
        ports.load_pretrained(directory)


@pytest.mark.parametrize("family", PORTED)
def test_unknown_config_field(tmp_path, family):
    directory = broken_copy(tmp_path, family, config_changes={"attn_logit_softcapping": 30.0})
    with pytest.raises(ConfigError, match=rf"unknown {family} config field\(s\) attn_logit_softcapping"):
        ports.load_pretrained(directory)


UNSUPPORTED = {
    "dream": ({"use_sliding_window": True}, r"use_sliding_window=True"),
    "mmada": ({"include_qkv_bias": "yes"}, r"include_qkv_bias='yes'"),
    "diffullama": ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"rope_scaling=\{'type': 'linear'"),
    "llada_moe": ({"moe_layer_freq": [1, 0]}, r"moe_layer_freq=\[1, 0\].*every layer must be a mixture"),
}


@pytest.mark.parametrize("family", PORTED)
def test_unsupported_config_value(tmp_path, family):
    changes, message = UNSUPPORTED[family]
    with pytest.raises(ConfigError, match=rf"unsupported {family} config: {message}"):
        ports.load_pretrained(broken_copy(tmp_path, family, config_changes=changes))


@pytest.mark.parametrize("changes, message", [
    ({"attention_bias": True}, r"attention_bias=True"),
    ({"mlp_bias": True}, r"mlp_bias=True"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
])
def test_diffullama_refuses_llama_variants_it_does_not_implement(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        ports.load_pretrained(broken_copy(tmp_path, "diffullama", config_changes=changes))


@pytest.mark.parametrize("changes, message", [
    ({"moe_router_score_function": "sigmoid"}, r"moe_router_score_function='sigmoid'"),
    ({"shared_expert_intermediate_size": 64}, r"shared_expert_intermediate_size=64"),
    ({"num_experts_per_tok": 9}, r"experts_per_token \(9\) must lie in 1\.\.num_experts \(8\)"),
])
def test_llada_moe_refuses_routing_it_does_not_implement(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        ports.load_pretrained(broken_copy(tmp_path, "llada_moe", config_changes=changes))


def test_mmada_vocabulary_fields_must_agree(tmp_path):
    with pytest.raises(ConfigError, match=r"new_vocab_size \(400\) differs from the embedding size \(384\)"):
        ports.load_pretrained(broken_copy(tmp_path, "mmada", config_changes={"new_vocab_size": 400}))
